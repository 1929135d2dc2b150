// The Evaluate panel: eval rows (pasted or dropped jsonl) scored on the base and the chosen states through
// POST /v1/evals; shows the results table with 95% intervals, each state against base, and the items where
// the states disagree. Uses app.js's `api`, `postJson`, `say`, `element` and `app`.
"use strict";

const ACCURACY = ["mc_acc", "exact", "contains"];

// The rows of a jsonl text; a bad line is one message naming it.
function evalRows(text) {
  const rows = [];
  text.split("\n").forEach((line, i) => {
    if (!line.trim()) return;
    try {
      rows.push(JSON.parse(line));
    } catch (err) {
      throw new Error("line " + (i + 1) + ": not valid JSON (" + err.message + ")");
    }
  });
  if (!rows.length) throw new Error("paste or drop eval rows first (one JSON object a line)");
  return rows;
}

const shown = (metric, value) => ACCURACY.includes(metric) ? (100 * value).toFixed(1) : value.toFixed(3);
const signed = (metric, value) => (value >= 0 ? "+" : "") + shown(metric, value);

function renderEvalStates() {
  const box = $("eval-states");
  const chosen = new Set([...box.querySelectorAll("input:checked")].map((input) => input.value));
  const names = app.models.filter((name) => name !== app.base);
  box.replaceChildren(element("legend", { textContent: "States (base is always scored)" }), ...names.map((name) => {
    const input = element("input", { type: "checkbox", value: name, checked: chosen.has(name) });
    const label = element("label", { textContent: name });
    label.prepend(input);
    return label;
  }));
}

function resultsTable(results) {
  const columns = [...new Set(results.map((r) => r.data + "\u0000" + r.metric))].map((key) => key.split("\u0000"));
  const states = [...new Set(results.map((r) => r.state))];
  const head = element("tr");
  head.append(element("th", { textContent: "state" }), ...columns.map(([data, metric]) =>
    element("th", { textContent: data + " " + metric + (ACCURACY.includes(metric) ? " %" : "") })));
  const lines = states.map((state) => {
    const tr = element("tr");
    tr.append(element("th", { textContent: state }), ...columns.map(([data, metric]) => {
      const r = results.find((x) => x.state === state && x.data === data && x.metric === metric);
      return element("td", { textContent: r ? shown(metric, r.value) + " [" + shown(metric, r.ci95[0]) + ", "
        + shown(metric, r.ci95[1]) + "]" : "" });
    }));
    return tr;
  });
  $("eval-table").replaceChildren(head, ...lines);
}

function comparisonItems(comparisons) {
  return comparisons.map((c) => element("li", {
    textContent: c.state + " vs base: " + c.data + " " + c.metric + " " + signed(c.metric, c.difference)
      + (ACCURACY.includes(c.metric) ? " pts" : "") + " (95% CI " + signed(c.metric, c.ci95[0]) + " … "
      + signed(c.metric, c.ci95[1]) + ", n=" + c.n + ")" }));
}

// One <details> per item whose states predicted differently (or, for loss rows, never: losses always differ).
function disagreements(details, rows) {
  const byItem = new Map();
  for (const d of details) {
    if (!("prediction" in d)) continue;
    if (!byItem.has(d.index)) byItem.set(d.index, []);
    byItem.get(d.index).push(d);
  }
  const items = [...byItem.entries()].filter(([, ds]) => new Set(ds.map((d) => JSON.stringify(d.prediction))).size > 1);
  if (!items.length) return [element("p", { className: "muted", textContent: "The states agree on every item." })];
  return items.map(([index, ds]) => {
    const box = element("details", { className: "eval-item" });
    box.dataset.index = index;
    box.append(element("summary", { textContent: "item " + index + ": " + (rows[index].prompt || "").slice(0, 80) }),
               ...ds.map((d) => element("pre", { textContent: d.state + ": " + JSON.stringify(d.prediction)
                 + (d.correct ? "  ✓" : "  ✗") })));
    return box;
  });
}

async function runEval() {
  let rows;
  try {
    rows = evalRows($("eval-rows").value);
  } catch (err) {
    say(err.message, true);
    return;
  }
  const states = [...$("eval-states").querySelectorAll("input:checked")].map((input) => input.value);
  const button = $("eval-run");
  button.disabled = true;
  say("evaluating " + rows.length + " rows on " + (states.length + 1) + " states…");
  try {
    const body = await postJson("/v1/evals", { states, rows, max_tokens: Number($("eval-max-tokens").value) });
    resultsTable(body.results);
    $("eval-comparisons").replaceChildren(...comparisonItems(body.comparisons));
    $("eval-disagree").replaceChildren(...disagreements(body.details, rows));
    $("eval-results").hidden = false;
    say("");
  } catch (err) {
    say(err.message, true);
  } finally {
    button.disabled = false;
  }
}

function wireEvalDrop() {
  const zone = $("eval-drop");
  for (const type of ["dragenter", "dragover"]) {
    zone.addEventListener(type, (event) => { event.preventDefault(); zone.classList.add("over"); });
  }
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", async (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    const file = event.dataTransfer.files[0];
    if (file) $("eval-rows").value = await file.text();
  });
}

document.addEventListener("DOMContentLoaded", () => {
  $("eval-run").addEventListener("click", runEval);
  wireEvalDrop();
  new MutationObserver(renderEvalStates).observe($("state-list"), { childList: true });
});
