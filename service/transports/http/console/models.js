// The models view, and the model list every view reads: GET /v1/models (every model, its versions,
// state, provider, input and labels) and GET /v1/models/recent (each version's last minute), polled
// every 2 s.

import { callJson } from "./api.js";
import { drawBars } from "./chart.js";

export const POLL_MILLISECONDS = 2000;

let known = null; // the latest model list, once one arrived
const subscribers = new Set();

/** `listener(models)` now (when a list is known) and after every poll. */
export function onModels(listener) {
  subscribers.add(listener);
  if (known) listener(known);
}

/** Whether `name` can answer now, and if not, a sentence saying why (from the model list). */
export function readiness(models, name) {
  const model = models.find((m) => m.name === name);
  if (!model) return { ready: false, text: `This server has no model ${name || "of this kind"}.` };
  const states = model.versions.map((v) => v.state);
  if (states.includes("READY")) return { ready: true, text: "" };
  if (states.includes("LOADING")) return { ready: false, text: `${name} is still loading; it can be tried once it is ready.` };
  const failed = model.versions.find((v) => v.state === "FAILED");
  if (failed) return { ready: false, text: `${name} failed to load: ${failed.reason || "no reason given"}` };
  return { ready: false, text: `${name} is unloaded.` };
}

/**
 * Fill a <select> with the names of the models that `fits`, keeping the visitor's choice; the first
 * time, `preferred` is chosen when present. Returns the chosen name ("" when none fits).
 */
export function fillModelSelect(select, models, fits, preferred) {
  const names = models.filter(fits).map((m) => m.name);
  const current = select.value || (names.includes(preferred) ? preferred : names[0] || "");
  const shown = [...select.options].map((o) => o.value);
  if (shown.join("\n") !== names.join("\n")) {
    select.replaceChildren(...names.map((name) => new Option(name, name)));
  }
  if (names.includes(current)) select.value = current;
  return select.value;
}

/** Show `text` in a view's notice paragraph, or hide it when empty. */
export function showNotice(element, text) {
  element.textContent = text;
  element.hidden = !text;
}

export function startModelsView() {
  const body = document.querySelector("#models-table tbody");
  const empty = document.getElementById("models-empty");

  async function poll() {
    if (!document.hidden) {
      try {
        const [list, recent] = await Promise.all([callJson("v1/models"), callJson("v1/models/recent")]);
        known = list.models;
        render(body, empty, list.models, recent.models);
        for (const listener of subscribers) listener(known);
      } catch {
        // the connection banner says what went wrong; the table keeps its last figures
      }
    }
    setTimeout(poll, POLL_MILLISECONDS);
  }
  poll();
}

function render(body, empty, models, recent) {
  const figures = new Map(recent.map((r) => [`${r.name}/${r.version}`, r]));
  const rows = [];
  for (const model of models) {
    const versions = model.versions.length ? model.versions : [{ version: "", state: "UNLOADED", reason: "", provider: "" }];
    for (const version of versions) {
      rows.push(row(model, version, figures.get(`${model.name}/${version.version}`)));
    }
  }
  body.replaceChildren(...rows);
  empty.hidden = models.length > 0;
}

function row(model, version, figures) {
  const tr = document.createElement("tr");
  tr.dataset.model = model.name;
  tr.dataset.version = version.version;
  const state = document.createElement("td");
  state.className = "state";
  const badge = document.createElement("span");
  badge.className = `badge state-${version.state.toLowerCase()}`;
  badge.textContent = version.state.toLowerCase();
  state.append(badge);
  if (version.reason) {
    const reason = document.createElement("span");
    reason.className = "reason";
    reason.textContent = version.reason;
    state.append(reason);
  }
  const chart = document.createElement("td");
  if (figures) {
    const canvas = document.createElement("canvas");
    canvas.width = 120;
    canvas.height = 28;
    canvas.setAttribute("role", "img");
    const peak = Math.max(0, ...figures.per_second);
    canvas.setAttribute("aria-label", `Requests per second over the last minute, at most ${peak}`);
    drawBars(canvas, figures.per_second);
    chart.append(canvas);
  }
  tr.append(
    cell(model.name, "th"),
    cell(model.kind || "?"),
    cell(version.version || "–"),
    state,
    cell(version.provider || "–"),
    cell(inputText(model.input)),
    cell(figures ? figures.rate.toFixed(2) : "–", "td", "number rate"),
    cell(milliseconds(figures?.p50_seconds), "td", "number p50"),
    cell(milliseconds(figures?.p99_seconds), "td", "number p99"),
    chart,
  );
  return tr;
}

function cell(text, tag = "td", className = "") {
  const element = document.createElement(tag);
  if (tag === "th") element.scope = "row";
  if (className) element.className = className;
  element.textContent = text;
  return element;
}

function inputText(input) {
  if (!input) return "tensors";
  return `${input.channels}x${input.height}x${input.width} ${input.color_mode}`;
}

function milliseconds(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  const ms = seconds * 1000;
  return `${ms < 10 ? ms.toFixed(2) : ms.toFixed(1)} ms`;
}
