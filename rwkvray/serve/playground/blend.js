// The blend panel of the playground (see app.js): a weighted sum of mounted states, mounted as a new state.
"use strict";

const BLEND_ROWS = 3;

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
    const chosen = pick.options.length ? pick.value : names[i] || "";  // a row set to (none) stays so
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
