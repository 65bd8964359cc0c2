"""The attention picture of a caption: one panel per word, the attention map over the image (Pillow only)."""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PANEL = 128  # pixels per side of each panel
LABEL = 18  # pixels above each panel for its word
COLUMNS = 6


def attention_png(image: bytes, words: list[str], maps: list[np.ndarray], panel: int = PANEL) -> bytes:
    """PNG: the image, then one panel per word with its (rows, columns) attention map upsampled over it."""
    base = Image.open(io.BytesIO(image)).convert("RGB").resize((panel, panel), Image.Resampling.BILINEAR)
    panels = [("", base)]
    for word, weights in zip(words, maps, strict=True):
        peak = float(weights.max()) or 1.0
        grey = np.clip(weights / peak * 255.0, 0, 255).astype(np.uint8)
        mask = Image.fromarray(grey, mode="L").resize((panel, panel), Image.Resampling.BILINEAR)
        dimmed = Image.blend(base, Image.new("RGB", base.size), 0.7)  # where it did not look: dark
        panels.append((word, Image.composite(base, dimmed, mask)))
    columns = min(COLUMNS, len(panels))
    rows = math.ceil(len(panels) / columns)
    canvas = Image.new("RGB", (columns * (panel + 4), rows * (panel + LABEL + 4)), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for index, (word, picture) in enumerate(panels):
        left = (index % columns) * (panel + 4)
        top = (index // columns) * (panel + LABEL + 4)
        draw.text((left + 2, top + 2), word or "(image)", fill="black", font=font)
        canvas.paste(picture, (left, top + LABEL))
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()
