"""Digits drawn with a pen in PIL, dark ink on light paper: images that scikit-learn never saw."""

from __future__ import annotations

import io
import math

from PIL import Image, ImageDraw

Point = tuple[float, float]


def _arc(
    cx: float, cy: float, rx: float, ry: float, start: float, end: float, steps: int = 24
) -> list[Point]:
    """Points on an ellipse, angles in degrees, 0 = right, 90 = down."""
    return [
        (cx + rx * math.cos(math.radians(a)), cy + ry * math.sin(math.radians(a)))
        for a in (start + (end - start) * i / steps for i in range(steps + 1))
    ]


# Strokes in a unit box (x right, y down), roughly as people write them.
STROKES: dict[str, list[list[Point]]] = {
    "0": [_arc(0.5, 0.5, 0.32, 0.46, 0, 360)],
    "1": [[(0.3, 0.22), (0.55, 0.04), (0.55, 0.98)]],
    "2": [[*_arc(0.5, 0.3, 0.3, 0.26, 190, 400), (0.15, 0.96), (0.88, 0.96)]],
    "3": [_arc(0.48, 0.27, 0.3, 0.23, 200, 450), _arc(0.48, 0.72, 0.34, 0.26, 270, 520)],
    "4": [[(0.62, 0.02), (0.1, 0.66), (0.9, 0.66)], [(0.66, 0.3), (0.66, 0.98)]],
    "5": [[(0.82, 0.04), (0.25, 0.04), (0.2, 0.45), *_arc(0.48, 0.68, 0.33, 0.28, 220, 500)]],
    "6": [_arc(0.62, 0.5, 0.42, 0.48, 250, 160) + _arc(0.5, 0.72, 0.3, 0.25, 180, 540)],
    "7": [[(0.15, 0.12), (0.3, 0.04), (0.85, 0.04), (0.45, 0.98)], [(0.3, 0.52), (0.8, 0.52)]],  # crossed
    "8": [_arc(0.5, 0.26, 0.26, 0.23, 0, 360), _arc(0.5, 0.73, 0.32, 0.25, 0, 360)],
    "9": [_arc(0.5, 0.3, 0.3, 0.26, 0, 360), [(0.8, 0.3), (0.72, 0.98)]],
}


def draw_digit(digit: str, size: int = 240, pen: int = 14, margin: float = 0.15) -> Image.Image:
    """A `size` x `size` grey image of the digit drawn with a `pen`-pixel dark pen on light paper."""
    image = Image.new("L", (size, size), 240)
    draw = ImageDraw.Draw(image)
    box = size * (1 - 2 * margin)
    for stroke in STROKES[digit]:
        points = [(size * margin + x * box * 0.8 + box * 0.1, size * margin + y * box) for x, y in stroke]
        draw.line(points, fill=25, width=pen, joint="curve")
    return image


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def photo_like(digit: str, seed: int = 0, size: int = 360) -> Image.Image:
    """A phone-photo-like picture of a digit on paper: uneven light, a tint, grey pencil, blur, noise."""
    import numpy as np
    from PIL import ImageFilter

    rng = np.random.default_rng(seed)
    pencil = draw_digit(digit, size=size, pen=size // 18).filter(ImageFilter.GaussianBlur(2))
    ink = (240 - np.asarray(pencil, np.float32)) / 215  # 0 on paper, 1 on ink
    yy, xx = np.mgrid[0:size, 0:size] / size
    light = 170 + 70 * (0.6 * xx + 0.4 * (1 - yy))  # brighter towards one corner
    grey = light * (1 - 0.65 * ink) + rng.normal(0, 6, (size, size))
    rgb = np.stack([grey * 1.0, grey * 0.96, grey * 0.88], axis=-1)  # warm indoor light
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")


def jpeg_bytes(image: Image.Image, quality: int = 80) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
