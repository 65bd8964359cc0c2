// A small bar chart on a canvas: one bar per value, scaled to the largest (no library needed).

const BAR = "#1f5fbf";
const BASE = "#8a8f98";

/** Draw `values` (oldest first) as bars filling the canvas; an all-zero series shows its baseline only. */
export function drawBars(canvas, values) {
  const context = canvas.getContext("2d");
  const { width, height } = canvas;
  context.clearRect(0, 0, width, height);
  context.fillStyle = BASE;
  context.fillRect(0, height - 1, width, 1);
  const peak = Math.max(0, ...values);
  if (!values.length || peak === 0) return;
  const step = width / values.length;
  context.fillStyle = BAR;
  values.forEach((value, index) => {
    const bar = Math.max(1, Math.round((value / peak) * (height - 2)));
    context.fillRect(Math.floor(index * step), height - 1 - bar, Math.max(1, Math.floor(step) - 0.5), bar);
  });
}
