// The generator view: POST /v1/generate with a digit and a seed (a PNG back, a grid for several
// images); and a walk between two seeds: GET /v1/latents gives each seed's latent vector, the page
// interpolates them and POST /v1/generate with {"latents": [...]} draws the point between.

import { call, callJson, showError } from "./api.js";
import { fillModelSelect, onModels, readiness, showNotice } from "./models.js";

/** The largest side a generated picture is scaled up to, in whole pixels per pixel. */
const SHOWN_SIZE = 256;

export function startGeneratorView() {
  const form = document.getElementById("generator-form");
  const select = document.getElementById("generator-model");
  const labels = document.getElementById("generator-label");
  const seed = document.getElementById("generator-seed");
  const count = document.getElementById("generator-count");
  const canvas = document.getElementById("generator-canvas");
  const usedSeed = document.getElementById("generator-used-seed");
  const notice = document.getElementById("generator-model-state");
  const error = document.getElementById("generator-error");
  const walkFrom = document.getElementById("walk-from");
  const walkTo = document.getElementById("walk-to");
  const position = document.getElementById("walk-position");
  const walkCanvas = document.getElementById("walk-canvas");
  const walkError = document.getElementById("walk-error");
  const latents = new Map(); // "model|seed" -> the seed's latent vector
  let walking = false;
  let walkAgain = false;

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      const response = await call("v1/generate", {
        method: "POST",
        query: { model: select.value, label: labels.value, seed: seed.value, count: count.value },
      });
      await drawPng(canvas, await response.blob());
      usedSeed.textContent = response.headers.get("x-seed") || "–";
      showError(error, null);
    } catch (failure) {
      showError(error, failure);
    }
  });

  async function latentOf(model, value) {
    const key = `${model}|${value}`;
    if (!latents.has(key)) {
      const answer = await callJson("v1/latents", { query: { model, seed: value } });
      latents.set(key, answer.latents[0]);
    }
    return latents.get(key);
  }

  /** Draw the point of the walk the slider is at; one request at a time, the newest position wins. */
  async function walk() {
    if (walking) {
      walkAgain = true;
      return;
    }
    walking = true;
    walkAgain = false;
    try {
      const model = select.value;
      const at = position.value;
      const [a, b] = await Promise.all([latentOf(model, walkFrom.value), latentOf(model, walkTo.value)]);
      const z = slerp(a, b, Number(at) / 100);
      const response = await call("v1/generate", {
        method: "POST",
        query: { model, label: labels.value },
        json: { latents: [z] },
      });
      await drawPng(walkCanvas, await response.blob());
      walkCanvas.dataset.position = at; // what the canvas shows now
      showError(walkError, null);
    } catch (failure) {
      showError(walkError, failure);
    }
    walking = false;
    if (walkAgain) walk();
  }

  position.addEventListener("input", walk);
  for (const input of [walkFrom, walkTo, labels]) input.addEventListener("change", walk);

  let shownModel = "";
  onModels((models) => {
    const chosen = fillModelSelect(select, models, (m) => m.kind === "generator", "dcgan");
    const state = readiness(models, chosen);
    showNotice(notice, state.text);
    const model = models.find((m) => m.name === chosen);
    if (model && chosen !== shownModel) {
      fillLabels(labels, model.labels);
      shownModel = chosen;
      if (state.ready) walk();
    }
  });
  select.addEventListener("change", () => {
    shownModel = "";
  });
}

function fillLabels(select, names) {
  const preferred = names.includes("7") ? names.indexOf("7") : 0;
  select.replaceChildren(...names.map((name, index) => new Option(name, String(index))));
  select.value = String(preferred);
}

/** Spherical interpolation, the usual path between Gaussian latent vectors; t = 0 gives `a` exactly. */
export function slerp(a, b, t) {
  const norm = (v) => Math.sqrt(v.reduce((sum, x) => sum + x * x, 0));
  const cosine = a.reduce((sum, x, i) => sum + x * b[i], 0) / (norm(a) * norm(b) || 1);
  const omega = Math.acos(Math.min(1, Math.max(-1, cosine)));
  const sine = Math.sin(omega);
  if (sine < 1e-6) return a.map((x, i) => x + t * (b[i] - x));
  const wa = Math.sin((1 - t) * omega) / sine;
  const wb = Math.sin(t * omega) / sine;
  return a.map((x, i) => wa * x + wb * b[i]);
}

/** A PNG on a canvas, scaled up by a whole factor without smoothing, so pixels stay pixels. */
export async function drawPng(canvas, blob) {
  const bitmap = await createImageBitmap(blob);
  const scale = Math.max(1, Math.floor(SHOWN_SIZE / Math.max(bitmap.width, bitmap.height)));
  canvas.width = bitmap.width * scale;
  canvas.height = bitmap.height * scale;
  const context = canvas.getContext("2d");
  context.imageSmoothingEnabled = false;
  context.drawImage(bitmap, 0, 0, canvas.width, canvas.height);
}
