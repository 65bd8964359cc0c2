// The scenes view: an image (dropped, chosen, or one of the examples shipped with the page) goes to
// POST /v1/classify (the scene classifier) and POST /v1/caption?attention=1 (the captioner); each
// word of the caption shows, while pointed at or focused, where the captioner attended saying it:
// a smooth map over the image for a captioner that attends over a grid (captioner), boxes weighted by
// attention for one that attends over object regions (captioner-butd).

import { call, showError } from "./api.js";
import { enableDrop } from "./digits.js";
import { fillModelSelect, onModels, readiness, showNotice } from "./models.js";

const DEFAULT_CLASSIFIER = "scenes-resnet";
const DEFAULT_CAPTIONER = "captioner";
/** How much the parts the captioner did not attend to are darkened (0: not at all, 1: black). */
const VEIL = 0.75;

export function startScenesView() {
  const canvas = document.getElementById("scenes-canvas");
  const overlay = document.getElementById("scenes-overlay");
  const classifier = document.getElementById("scenes-classifier");
  const captioner = document.getElementById("scenes-captioner");
  const beam = document.getElementById("scenes-beam");
  const notice = document.getElementById("scenes-model-state");
  const error = document.getElementById("scenes-error");
  const classOut = document.getElementById("scenes-class");
  const captionOut = document.getElementById("scenes-caption");
  let image = null; // the Blob shown
  let box = { x: 0, y: 0, width: canvas.width, height: canvas.height }; // where it is drawn
  let attention = [];
  let regions = []; // [left, top, right, bottom] fractions of the image, for a captioner over regions

  async function show(blob) {
    image = blob;
    classOut.textContent = "…";
    captionOut.replaceChildren();
    hideAttention();
    const context = canvas.getContext("2d");
    context.fillStyle = "#ffffff";
    context.fillRect(0, 0, canvas.width, canvas.height);
    try {
      const bitmap = await createImageBitmap(blob);
      const scale = Math.min(canvas.width / bitmap.width, canvas.height / bitmap.height);
      const width = Math.round(bitmap.width * scale);
      const height = Math.round(bitmap.height * scale);
      box = { x: (canvas.width - width) / 2, y: (canvas.height - height) / 2, width, height };
      context.imageSmoothingEnabled = scale < 1; // small scenes: keep their pixels sharp
      context.drawImage(bitmap, box.x, box.y, width, height);
    } catch {
      // not an image the browser can show: the server will say what is wrong with it
    }
    await describe();
  }

  async function describe() {
    if (!image) return;
    showError(error, null);
    // Before the model list arrived (or with none of a kind), the usual names: the server says the rest.
    const [classified, captioned] = await Promise.allSettled([
      call("v1/classify", {
        method: "POST",
        query: { model: classifier.value || DEFAULT_CLASSIFIER, top_k: 3 },
        body: image,
      }),
      call("v1/caption", {
        method: "POST",
        query: { model: captioner.value || DEFAULT_CAPTIONER, beam: beam.value, attention: 1 },
        body: image,
      }),
    ]);
    const failures = [classified, captioned].filter((r) => r.status === "rejected").map((r) => r.reason);
    if (failures.length) showError(error, failures[0]);
    if (classified.status === "fulfilled") {
      const best = (await classified.value.json()).predictions[0];
      classOut.textContent = `${best.label} (${(best.score * 100).toFixed(1)} %)`;
    } else {
      classOut.textContent = "–";
    }
    if (captioned.status === "fulfilled") {
      const answer = await captioned.value.json();
      showCaption(answer.captions[0], answer.regions || []);
    }
  }

  function showCaption(caption, boxes) {
    attention = caption.attention || [];
    regions = boxes;
    const words = caption.words.map((word, index) => {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "word";
      button.textContent = word;
      button.dataset.index = String(index);
      button.setAttribute("aria-label", `${word}: show where the captioner looked`);
      for (const type of ["mouseenter", "focus"]) button.addEventListener(type, () => showAttention(index));
      for (const type of ["mouseleave", "blur"]) button.addEventListener(type, hideAttention);
      return button;
    });
    const spaced = words.flatMap((word, index) => (index ? [" ", word] : [word]));
    captionOut.replaceChildren(...spaced);
  }

  /** Darken the scene where word `index` paid little attention: a grid map smoothly scaled up, or
   * the regions' boxes, each as bright and as outlined as the share of attention it got. */
  function showAttention(index) {
    const map = attention[index];
    if (!map) return;
    const context = overlay.getContext("2d");
    context.clearRect(0, 0, overlay.width, overlay.height);
    const overRegions = regions.length > 0 && map.columns === 1 && map.rows === regions.length;
    if (overRegions) drawRegions(context, map.weights);
    else drawGrid(context, map);
    overlay.dataset.word = String(index);
    overlay.dataset.regions = overRegions ? String(regions.length) : "0";
    overlay.hidden = false;
  }

  function drawGrid(context, map) {
    const peak = Math.max(...map.weights) || 1;
    const small = new OffscreenCanvas(map.columns, map.rows);
    const pixels = new ImageData(map.columns, map.rows);
    map.weights.forEach((weight, i) => {
      pixels.data[4 * i + 3] = Math.round(255 * VEIL * (1 - weight / peak)); // black, by how little attended
    });
    small.getContext("2d").putImageData(pixels, 0, 0);
    context.imageSmoothingEnabled = true;
    context.drawImage(small, box.x, box.y, box.width, box.height);
  }

  function drawRegions(context, weights) {
    const peak = Math.max(...weights) || 1;
    context.fillStyle = `rgba(0, 0, 0, ${VEIL})`;
    context.fillRect(box.x, box.y, box.width, box.height);
    // the least attended first, so that the most attended box is drawn whole, on top
    const order = weights.map((weight, i) => [weight / peak, i]).sort((a, b) => a[0] - b[0]);
    for (const [share, i] of order) {
      const [left, top, right, bottom] = regions[i];
      const x = box.x + left * box.width;
      const y = box.y + top * box.height;
      const width = Math.max((right - left) * box.width, 1);
      const height = Math.max((bottom - top) * box.height, 1);
      context.clearRect(x, y, width, height);
      context.fillStyle = `rgba(0, 0, 0, ${VEIL * (1 - share)})`;
      context.fillRect(x, y, width, height);
      context.strokeStyle = `rgba(255, 196, 0, ${0.25 + 0.75 * share})`;
      context.lineWidth = 1 + 2 * share;
      context.strokeRect(x, y, width, height);
    }
  }

  function hideAttention() {
    overlay.hidden = true;
    delete overlay.dataset.word;
    delete overlay.dataset.regions;
  }

  for (const button of document.querySelectorAll("[data-example]")) {
    button.addEventListener("click", async () => {
      try {
        const response = await fetch(`console/${button.dataset.example}`);
        await show(await response.blob());
      } catch (failure) {
        showError(error, failure);
      }
    });
  }
  document.getElementById("scenes-file").addEventListener("change", (event) => {
    const file = event.target.files[0];
    if (file) show(file);
  });
  enableDrop(document.getElementById("scenes-drop"), show);
  for (const select of [classifier, captioner, beam]) select.addEventListener("change", describe);

  onModels((models) => {
    const chosenClassifier = fillModelSelect(
      classifier,
      models,
      (m) => m.kind === "classifier" && m.input?.channels === 3,
      DEFAULT_CLASSIFIER,
    );
    const chosenCaptioner = fillModelSelect(captioner, models, (m) => m.kind === "captioner", DEFAULT_CAPTIONER);
    const problems = [readiness(models, chosenClassifier).text, readiness(models, chosenCaptioner).text];
    showNotice(notice, problems.filter(Boolean).join(" "));
  });
}
