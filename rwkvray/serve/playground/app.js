// rwkvray state playground: streams one prompt to 2-4 models (the base and mounted states) at once, with the
// same sampling settings and seed, and manages states (mount, upload, unmount, blend) through the same
// OpenAI-compatible API any client uses. Plain JS, no dependencies, same-origin requests only.
"use strict";

const KEY_STORAGE = "rwkvray-api-key";
const BLEND_ROWS = 3;
const $ = (id) => document.getElementById(id);

const app = {
  key: sessionStorage.getItem(KEY_STORAGE),
  base: null,          // the base model's name (first entry of /v1/models)
  models: [],          // names a column can pick
  listing: null,       // the last GET /v1/states answer
  columns: [],         // {model, history, controller, ...elements}
};

// ------------------------------------------------------------------ API

class ApiFailure extends Error {
  constructor(status, message, code = null) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  if (app.key) headers.set("Authorization", "Bearer " + app.key);
  if (typeof options.body === "string") headers.set("Content-Type", "application/json");
  let response;
  try {
    response = await fetch(path, { ...options, headers });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiFailure(0, "the server did not answer (" + err.message + ")");
  }
  if (!response.ok) {
    let message = response.status + " " + response.statusText;
    let code = null;
    try {
      const body = await response.json();
      if (body && body.error && body.error.message) ({ message, code } = body.error);
    } catch (_) { /* not JSON: keep the status line */ }
    if (response.status === 401) askForKey(message);
    throw new ApiFailure(response.status, message, code);
  }
  return response;
}

const getJson = async (path) => (await api(path)).json();
const postJson = async (path, body) => (await api(path, { method: "POST", body: JSON.stringify(body) })).json();

// Yields the parsed `data:` events of a server-sent-events body, stopping at [DONE].
async function* sseEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice("data: ".length);
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

// ------------------------------------------------------------------ messages and key

function say(text, isError = false) {
  const box = $("message");
  box.textContent = text;
  box.classList.toggle("error", isError);
}

function askForKey(reason) {
  sessionStorage.removeItem(KEY_STORAGE);
  app.key = null;
  $("main").hidden = true;
  $("change-key").hidden = true;
  $("key-form").hidden = false;
  say(reason || "", Boolean(reason));
  $("key-input").focus();
}

async function connect() {
  try {
    const models = (await getJson("/v1/models")).data.map((m) => m.id);
    app.base = models[0];
    $("key-form").hidden = true;
    $("main").hidden = false;
    $("change-key").hidden = false;
    $("server-line").textContent = "base model: " + app.base;
    say("");
    await refreshStates(models);
  } catch (err) {
    if (err.status !== 401) askForKey(err.message);
  }
}

// ------------------------------------------------------------------ columns

function modelOptions(select, chosen) {
  select.replaceChildren(...app.models.map((name) => {
    const option = new Option(name === app.base ? name + " (base)" : name, name);
    option.selected = name === chosen;
    return option;
  }));
  if (!app.models.includes(chosen) && chosen) select.add(new Option(chosen + " (gone)", chosen, true, true));
}

function element(tag, props) {
  return Object.assign(document.createElement(tag), props);
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

// ------------------------------------------------------------------ states

// One line from a mounted state's card (the agreed card format; blends record their recipe).
function cardSummary(entry) {
  const card = entry.card;
  if (!card) return entry.warning || "no card";
  const parts = [];
  if (card.blend) parts.push("blend of " + Object.entries(card.blend).map(([n, w]) => n + " " + w).join(", "));
  if (card.method) parts.push("method " + card.method);
  if (typeof card.steps === "number") parts.push(card.steps + " steps");
  if (typeof card.loss === "number") parts.push("final loss " + card.loss.toFixed(4));
  if (card.data && card.data.file) parts.push("data " + card.data.file);
  if (typeof entry.base_match === "boolean") parts.push(entry.base_match ? "base matches" : "OTHER BASE");
  else if (card.base && card.base.file) parts.push("base " + card.base.file);
  if (entry.warning) parts.push(entry.warning);
  return parts.join(" · ");
}

function stateButton(text, label, action) {
  const button = element("button", { type: "button", textContent: text });
  button.setAttribute("aria-label", label);
  button.addEventListener("click", action);
  return button;
}

function stateItem(name, entry, unmounted) {
  const item = element("li");
  item.dataset.name = name;
  const status = entry ? "mounted · " + entry.source : unmounted ? "unmounted" : "in states_dir";
  const buttons = element("div", { className: "buttons" });
  buttons.append(stateButton("Card", "Show the card of " + name, () => showCard(name)),
                 entry ? stateButton("Unmount", "Unmount " + name, () => unmount(name))
                       : stateButton("Mount", "Mount " + name, () => mount(name)));
  item.append(element("strong", { textContent: name }), element("span", { className: "badge", textContent: status }),
              element("p", { className: "summary", textContent: entry ? cardSummary(entry) : "" }), buttons);
  return item;
}

function renderStates() {
  const listing = app.listing;
  const mounted = new Map(listing.mounted.map((entry) => [entry.name, entry]));
  const names = [...new Set([...mounted.keys(), ...listing.known])].sort();
  const items = names.map((name) => stateItem(name, mounted.get(name), listing.unmounted.includes(name)));
  $("state-list").replaceChildren(...(items.length ? items : [element("li", { textContent: "No states yet." })]));
  renderBlendChoices(names);
}

async function refreshStates(models) {
  try {
    app.listing = await getJson("/v1/states");
    app.models = models || (await getJson("/v1/models")).data.map((m) => m.id);
    for (const entry of app.listing.mounted) {
      if (!app.models.includes(entry.name)) app.models.push(entry.name);
    }
    renderStates();
    if (app.columns.length) app.columns.forEach((c) => modelOptions(c.select, c.model));
    else buildColumns();
  } catch (err) {
    say(err.message, true);
  }
}

async function stateAction(work, done) {
  try {
    await work();
    say(done);
  } catch (err) {
    say(err.message, true);
  }
  await refreshStates();
}

const mount = (name) => stateAction(() => postJson("/v1/states", { name }), "Mounted " + name + ".");
const unmount = (name) => stateAction(
  () => api("/v1/states/" + encodeURIComponent(name), { method: "DELETE" }), "Unmounted " + name + ".");

async function showCard(name) {
  try {
    const details = await getJson("/v1/states/" + encodeURIComponent(name));
    $("details-title").textContent = "State card: " + name;
    $("details-body").textContent = JSON.stringify(details, null, 2);
    $("details").hidden = false;
    $("details-close").focus();
  } catch (err) {
    say(err.message, true);
  }
}

// Sends an upload or a blend; when its name is taken (409 state_exists), asks before sending it again with
// replace (the server keeps the old one as NAME.prev).
async function askBeforeReplacing(send) {
  try {
    return await send(false);
  } catch (err) {
    if (err.code !== "state_exists") throw err;
    if (!window.confirm(err.message.replace(/; send .*/, "") + ". Replace it? The current one is kept as a "
                        + "previous version.")) throw new ApiFailure(409, "Not replaced.", err.code);
    return await send(true);
  }
}

function uploadFile(file) {
  const name = $("upload-name").value.trim() || file.name.replace(/\.pth$/i, "");
  return stateAction(async () => {
    await askBeforeReplacing((replace) => {
      const form = new FormData();
      form.append("name", name);
      form.append("file", file, file.name);
      if (replace) form.append("replace", "true");
      return api("/v1/states", { method: "POST", body: form });
    });
    $("upload-name").value = "";
  }, "Uploaded and mounted " + name + ".");
}

// ------------------------------------------------------------------ blend

function buildBlendRows() {
  const rows = $("blend-rows");
  for (let i = 0; i < BLEND_ROWS; i++) {
    const row = document.createElement("div");
    row.className = "blend-row";
    const pick = document.createElement("select");
    pick.id = "blend-state-" + i;
    pick.setAttribute("aria-label", "Blend state " + (i + 1));
    const slider = document.createElement("input");
    Object.assign(slider, { type: "range", min: "-1", max: "1", step: "0.05", id: "blend-weight-" + i });
    slider.value = i < 2 ? "0.5" : "0";
    slider.setAttribute("aria-label", "Weight of blend state " + (i + 1));
    const shown = document.createElement("output");
    shown.htmlFor = slider.id;
    shown.id = "blend-weight-" + i + "-value";
    const update = () => {
      shown.textContent = Number(slider.value).toFixed(2);
      slider.setAttribute("aria-valuetext", shown.textContent);
    };
    slider.addEventListener("input", update);
    update();
    row.append(pick, slider, shown);
    rows.append(row);
  }
}

function renderBlendChoices(names) {
  for (let i = 0; i < BLEND_ROWS; i++) {
    const pick = $("blend-state-" + i);
    const chosen = pick.value || names[i] || "";
    pick.replaceChildren(new Option("(none)", ""), ...names.map((n) => new Option(n, n)));
    pick.value = names.includes(chosen) ? chosen : "";
  }
}

async function createBlend() {
  const name = $("blend-name").value.trim();
  const blend = {};
  for (let i = 0; i < BLEND_ROWS; i++) {
    const state = $("blend-state-" + i).value;
    if (state) blend[state] = (blend[state] || 0) + Number($("blend-weight-" + i).value);
  }
  if (Object.keys(blend).length < 2) {
    say("Pick at least two different states to blend.", true);
    return;
  }
  await stateAction(() => askBeforeReplacing((replace) => postJson("/v1/states", { name, blend, replace })),
                    "Blend " + name + " mounted.");
}

// ------------------------------------------------------------------ wiring

function wireDropZone() {
  const zone = $("drop-zone");
  for (const type of ["dragenter", "dragover"]) {
    zone.addEventListener(type, (event) => {
      event.preventDefault();
      zone.classList.add("over");
    });
  }
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    const file = event.dataTransfer.files[0];
    if (file) uploadFile(file);
  });
  $("upload-file").addEventListener("change", (event) => {
    const file = event.target.files[0];
    if (file) uploadFile(file).then(() => { event.target.value = ""; });
  });
}

function start() {
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    app.key = $("key-input").value.trim();  // "" for a server without a key
    sessionStorage.setItem(KEY_STORAGE, app.key);
    $("key-input").value = "";
    connect();
  });
  $("change-key").addEventListener("click", () => askForKey(""));
  $("prompt-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sendPrompt();
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      sendPrompt();
    }
  });
  $("stop").addEventListener("click", () => app.columns.forEach((c) => c.controller && c.controller.abort()));
  $("clear").addEventListener("click", clearColumns);
  $("mode").addEventListener("change", clearColumns);
  $("column-count").addEventListener("change", buildColumns);
  $("refresh").addEventListener("click", () => refreshStates());
  $("blend-button").addEventListener("click", createBlend);
  $("details-close").addEventListener("click", () => { $("details").hidden = true; });
  wireDropZone();
  buildBlendRows();
  if (app.key !== null) {
    connect();
    return;
  }
  fetch("/v1/models").then((response) => {  // a server without a key needs no question
    if (!response.ok) throw new Error("a key is needed");
    app.key = "";
    sessionStorage.setItem(KEY_STORAGE, "");
    return connect();
  }).catch(() => askForKey(""));
}

document.addEventListener("DOMContentLoaded", start);
