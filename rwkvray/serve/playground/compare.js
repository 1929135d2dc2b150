// The compare panel of the playground (see app.js): 2-4 columns, each streaming the same prompt to its model.
"use strict";

function modelOptions(select, chosen) {
  select.replaceChildren(...app.models.map((name) => {
    const option = new Option(name === app.base ? name + " (base)" : name, name);
    option.selected = name === chosen;
    return option;
  }));
  if (!app.models.includes(chosen) && chosen) select.add(new Option(chosen + " (gone)", chosen, true, true));
}

// Column i; `old` (the column it replaces when the count changes) hands over its model, history and replies.
function makeColumn(i, old) {
  const id = "col-" + i;
  const column = { model: old ? old.model : app.models[i % app.models.length], history: old ? old.history : [],
                   controller: null };
  const label = element("label", { htmlFor: id + "-model", textContent: "Column " + (i + 1) });
  column.select = element("select", { id: id + "-model" });
  modelOptions(column.select, column.model);
  column.select.addEventListener("change", () => {
    column.model = column.select.value;
    column.history = [];
    column.output.replaceChildren();
    column.stats.textContent = "";
    delete column.output.dataset.state;
  });
  column.stats = element("p", { className: "stats", id: id + "-stats", textContent: old ? old.stats.textContent : "" });
  column.output = element("div", { className: "output", id: id + "-output" });
  column.output.setAttribute("aria-live", "polite");
  column.output.setAttribute("aria-label", "Column " + (i + 1) + " replies");
  if (old) column.output.replaceChildren(...old.output.childNodes);
  const box = element("article", { className: "column", id });
  box.append(label, column.select, column.stats, column.output);
  return [column, box];
}

function buildColumns() {
  const previous = app.columns;
  const made = Array.from({ length: Number($("column-count").value) }, (_, i) => makeColumn(i, previous[i]));
  app.columns = made.map(([column]) => column);
  $("columns").replaceChildren(...made.map(([, box]) => box));
}

function settings() {
  const body = {
    max_tokens: Number($("max-tokens").value),
    temperature: Number($("temperature").value),
    top_p: Number($("top-p").value),
    stream: true,
    stream_options: { include_usage: true },
  };
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  return body;
}

function bubble(column, role, text) {
  const line = document.createElement("div");
  line.className = role === "user" ? "turn user" : "turn reply";
  line.textContent = text;
  column.output.append(line);
  return line;
}

// Time to first token, and tokens/s over the whole request (sending to the last token), which stays defined
// even when a slow client reads the whole stream at once.
function showStats(column, started, first, ended, tokens) {
  const parts = [];
  if (first !== null) parts.push("first token " + Math.round(first - started) + " ms");
  if (tokens !== null) parts.push(tokens + " tokens", (tokens / ((ended - started) / 1000)).toFixed(1) + " tok/s");
  column.stats.textContent = parts.join(" · ");
}

// Streams one column's reply; the same request body goes to every column except for `model`.
async function runColumn(column, prompt, chat) {
  column.controller = new AbortController();
  column.output.dataset.state = "running";
  const body = { ...settings(), model: column.model };
  if (chat) {
    column.history.push({ role: "user", content: prompt });
    body.messages = column.history.slice();
    bubble(column, "user", prompt);
  } else {
    body.prompt = prompt;
    column.output.replaceChildren();
  }
  const reply = bubble(column, "assistant", "");
  const started = performance.now();
  let first = null, tokens = null;
  try {
    const response = await api(chat ? "/v1/chat/completions" : "/v1/completions", {
      method: "POST", body: JSON.stringify(body), signal: column.controller.signal,
    });
    for await (const event of sseEvents(response)) {
      if (event.error) throw new ApiFailure(0, event.error.message);
      if (event.usage) tokens = event.usage.completion_tokens;
      const choice = event.choices && event.choices[0];
      const piece = choice ? (chat ? choice.delta.content : choice.text) : "";
      if (piece) {
        if (first === null) first = performance.now();
        reply.textContent += piece;
      }
    }
    if (chat) column.history.push({ role: "assistant", content: reply.textContent });
    showStats(column, started, first, performance.now(), tokens);
    column.output.dataset.state = "done";
  } catch (err) {
    if (chat) column.history.pop();
    reply.classList.add("error");
    reply.textContent = err.name === "AbortError" ? "(stopped)" : err.message;
    column.output.dataset.state = "error";
  }
}

async function sendPrompt() {
  const prompt = $("prompt").value;
  if (!prompt.trim()) {
    say("Type a prompt first.", true);
    return;
  }
  say("");
  const chat = $("mode").value === "chat";
  $("send").disabled = true;
  try {
    await Promise.all(app.columns.map((column) => runColumn(column, prompt, chat)));
  } finally {
    $("send").disabled = false;
  }
  await refreshStates();  // a known state mounts on its first request
}

function clearColumns() {
  for (const column of app.columns) {
    column.history = [];
    column.output.replaceChildren();
    column.stats.textContent = "";
    delete column.output.dataset.state;
  }
}
