// The states panel of the playground (see app.js): the list of states, mount, unmount, cards, uploads.
"use strict";

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
