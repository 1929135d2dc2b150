// rwkvray state playground: streams one prompt to 2-4 models (the base and mounted states) at once, with the
// same sampling settings and seed, and manages states (mount, upload, unmount, blend) through the same
// OpenAI-compatible API any client uses. Plain JS, no dependencies, same-origin requests only.
// This file: the shared state, the API calls, the key, and the wiring; one script per panel beside it
// (compare.js, states.js, blend.js), loaded after this one.
"use strict";

const KEY_STORAGE = "rwkvray-api-key";
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

function element(tag, props) {
  return Object.assign(document.createElement(tag), props);
}

// ------------------------------------------------------------------ wiring

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
