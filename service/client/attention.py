"""The attention picture of a caption: one panel per word, where the decoder looked (Pillow only).

Over a grid, the map is upsampled over the image and the image is darkened where the decoder did
not look; over regions, each region is drawn as a box, lit and outlined in proportion to its weight.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PANEL = 128  # pixels per side of each panel
LABEL = 18  # pixels above each panel for its word
COLUMNS = 6


def attention_png(
    image: bytes,
    words: list[str],
    maps: list[np.ndarray],
    regions: list[tuple[float, float, float, float]] | None = None,
    panel: int = PANEL,
) -> bytes:
    """PNG: the image, then one panel per word: its (rows, columns) attention map upsampled over the
    image, or, with `regions` (left, top, right, bottom in fractions), one box per region's weight."""
    base = Image.open(io.BytesIO(image)).convert("RGB").resize((panel, panel), Image.Resampling.BILINEAR)
    panels = [("", base)]
    for word, weights in zip(words, maps, strict=True):
        peak = float(weights.max()) or 1.0
        dimmed = Image.blend(base, Image.new("RGB", base.size), 0.7)  # where it did not look: dark
        if regions is None:
            grey = np.clip(weights / peak * 255.0, 0, 255).astype(np.uint8)
            mask = Image.fromarray(grey, mode="L").resize((panel, panel), Image.Resampling.BILINEAR)
            panels.append((word, Image.composite(base, dimmed, mask)))
        else:
            panels.append((word, _boxes(base, dimmed, regions, weights.ravel() / peak)))
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


def _boxes(
    base: Image.Image,
    dimmed: Image.Image,
    regions: list[tuple[float, float, float, float]],
    strength: np.ndarray,
) -> Image.Image:
    """The dimmed image with each region lit and outlined in proportion to its weight (1: the peak)."""
    picture = dimmed.copy()
    draw = ImageDraw.Draw(picture)
    size = base.size[0]
    for (left, top, right, bottom), weight in sorted(
        zip(regions, strength.tolist(), strict=True), key=lambda r: r[1]
    ):
        box = tuple(round(v * size) for v in (left, top, right, bottom))
        if box[2] <= box[0] or box[3] <= box[1]:
            continue
        lit = Image.blend(dimmed.crop(box), base.crop(box), max(0.0, min(1.0, weight)))
        picture.paste(lit, box[:2])
        if weight >= 0.05:
            shade = int(80 + 175 * weight)
            draw.rectangle(box, outline=(shade, shade, 0), width=1 + round(2 * weight))
    return picture
