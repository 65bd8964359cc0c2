// The digits view: draw on a canvas (pointer events: mouse, touch and pen) or drop an image file;
// POST /v1/classify with the PNG, and show the ranked classes as bars while drawing.

import { call, showError } from "./api.js";
import { fillModelSelect, onModels, readiness, showNotice } from "./models.js";

const DEFAULT_MODEL = "lenet5";
const PAPER = "#ffffff";
const INK = "#111111";
const PEN_WIDTH = 18;
/** Wait this long after a stroke moves before asking, so a drawing sends a few requests, not hundreds. */
const SETTLE_MILLISECONDS = 80;

export function startDigitsView() {
  const canvas = document.getElementById("digits-canvas");
  const context = canvas.getContext("2d");
  const select = document.getElementById("digits-model");
  const notice = document.getElementById("digits-model-state");
  const error = document.getElementById("digits-error");
  const top = document.getElementById("digits-top");
  const bars = document.getElementById("digits-bars");
  let drawing = false;
  let last = null;
  let blank = true;
  let timer = null;
  let busy = false;
  let again = false;

  function clear() {
    context.fillStyle = PAPER;
    context.fillRect(0, 0, canvas.width, canvas.height);
    blank = true;
    top.textContent = "–";
    bars.replaceChildren();
    showError(error, null);
  }

  function point(event) {
    const box = canvas.getBoundingClientRect();
    return {
      x: ((event.clientX - box.left) * canvas.width) / box.width,
      y: ((event.clientY - box.top) * canvas.height) / box.height,
    };
  }

  function stroke(from, to) {
    context.strokeStyle = INK;
    context.lineWidth = PEN_WIDTH;
    context.lineCap = "round";
    context.lineJoin = "round";
    context.beginPath();
    context.moveTo(from.x, from.y);
    context.lineTo(to.x, to.y);
    context.stroke();
    blank = false;
  }

  canvas.addEventListener("pointerdown", (event) => {
    if (event.pointerType === "mouse" && event.button !== 0) return;
    canvas.setPointerCapture(event.pointerId);
    drawing = true;
    last = point(event);
    stroke(last, last);
    event.preventDefault();
  });
  canvas.addEventListener("pointermove", (event) => {
    if (!drawing) return;
    const next = point(event);
    stroke(last, next);
    last = next;
    soon();
  });
  for (const type of ["pointerup", "pointercancel"]) {
    canvas.addEventListener(type, () => {
      if (!drawing) return;
      drawing = false;
      soon();
    });
  }

  /** Classify the drawing soon; one request at a time, the newest drawing wins. */
  function soon() {
    if (blank) return;
    if (busy) {
      again = true;
      return;
    }
    clearTimeout(timer);
    timer = setTimeout(send, SETTLE_MILLISECONDS);
  }

  async function send() {
    busy = true;
    again = false;
    const png = await new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
    await classify(png);
    busy = false;
    if (again) soon();
  }

  async function classify(image) {
    try {
      const response = await call("v1/classify", {
        method: "POST",
        query: { model: select.value || DEFAULT_MODEL, top_k: 10 }, // no list yet: the usual name
        body: image,
      });
      const answer = await response.json();
      showError(error, null);
      render(answer.predictions);
    } catch (failure) {
      showError(error, failure);
    }
  }

  function render(predictions) {
    top.textContent = predictions.length ? predictions[0].label : "–";
    bars.replaceChildren(
      ...predictions.map((p) => {
        const item = document.createElement("li");
        const label = document.createElement("span");
        label.className = "label";
        label.textContent = p.label;
        const track = document.createElement("span");
        track.className = "track";
        const fill = document.createElement("span");
        fill.className = "fill";
        fill.style.width = `${(p.score * 100).toFixed(1)}%`;
        track.append(fill);
        const value = document.createElement("span");
        value.className = "value";
        value.textContent = `${(p.score * 100).toFixed(1)} %`;
        item.append(label, track, value);
        return item;
      }),
    );
  }

  /** An image file: shown on the paper, and sent as it is (the server adapts photos of digits). */
  async function useFile(file) {
    clear();
    try {
      const bitmap = await createImageBitmap(file);
      const scale = Math.min(canvas.width / bitmap.width, canvas.height / bitmap.height);
      const w = bitmap.width * scale;
      const h = bitmap.height * scale;
      context.drawImage(bitmap, (canvas.width - w) / 2, (canvas.height - h) / 2, w, h);
    } catch {
      // not an image the browser can show: the server will say what is wrong with it
    }
    await classify(file);
  }

  document.getElementById("digits-clear").addEventListener("click", clear);
  document.getElementById("digits-file").addEventListener("change", (event) => {
    const file = event.target.files[0];
    if (file) useFile(file);
  });
  enableDrop(document.getElementById("digits-drop"), useFile);

  onModels((models) => {
    const chosen = fillModelSelect(
      select,
      models,
      (m) => m.kind === "classifier" && m.input?.channels === 1,
      DEFAULT_MODEL,
    );
    showNotice(notice, readiness(models, chosen).text);
  });
  select.addEventListener("change", () => {
    if (!blank) soon();
  });
  clear();
}

/** Let `element` take a dropped file: `use(file)`. */
export function enableDrop(element, use) {
  element.addEventListener("dragover", (event) => {
    event.preventDefault();
    element.classList.add("dragging");
  });
  element.addEventListener("dragleave", () => element.classList.remove("dragging"));
  element.addEventListener("drop", (event) => {
    event.preventDefault();
    element.classList.remove("dragging");
    const file = event.dataTransfer?.files?.[0];
    if (file) use(file);
  });
}
