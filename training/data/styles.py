"""How a scene is drawn: everything about a picture that its caption does not mention.

A caption says which objects there are (size, colour, shape) and in which order; it says nothing
about the background, the exact shade of a colour, the pen, the resolution the picture was drawn
at or how it was compressed. A model that only ever sees one way of drawing learns the drawing, not
the scene (a captioner trained on light backgrounds alone named nothing on a dark one), so every
scene samples a `Style` from wide ranges, and the style-shift split samples from ranges that
training never uses (`SHIFTED_STYLE`): other background families, paler shades, larger canvases and
stronger JPEG compression.

What is varied keeps every caption true: hues stay inside their colour's range, objects keep a
clear contrast with the background under them, and outlines are a darker shade of the fill.
"""

from __future__ import annotations

import colorsys
import io
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

#: Hue (degrees, may wrap below 0) and HSV value ranges of each colour name; the saturation range
#: comes from the style. Each range holds the colour as drawing programs name it (red 0, yellow 60,
#: green 120, blue 240 degrees); orange, cyan and purple hues are never drawn, so no shade is in doubt.
HUES: dict[str, tuple[float, float]] = {
    "red": (-10.0, 10.0),
    "yellow": (45.0, 62.0),
    "green": (95.0, 150.0),
    "blue": (200.0, 245.0),
}
VALUES: dict[str, tuple[float, float]] = {
    "red": (0.6, 1.0),
    "yellow": (0.82, 1.0),
    "green": (0.45, 1.0),
    "blue": (0.55, 1.0),
}
#: Euclidean RGB distance an object's fill keeps from the background under it.
MIN_CONTRAST = 80.0
FILTERS = (
    Image.Resampling.NEAREST,
    Image.Resampling.BOX,
    Image.Resampling.BILINEAR,
    Image.Resampling.BICUBIC,
    Image.Resampling.LANCZOS,
)
MAX_ROTATION = 12.0  # degrees either way, squares and triangles
MAX_DRAWING_SIDE = 512  # px: the supersampled canvas is at most this big


@dataclass(frozen=True)
class StyleRanges:
    """The ranges a scene's style is drawn from."""

    backgrounds: tuple[str, ...]
    saturation: tuple[float, float]  # HSV saturation of the objects' fill
    canvas: tuple[int, int]  # side in px the scene is drawn at before it is resized to 64x64 (never
    # below 64: drawn smaller and enlarged, a small shape has too few pixels to tell its kind)
    jpeg_quality: tuple[int, int]
    jpeg_probability: float


#: Used for train, validation, test and compositional.
TRAINING_STYLE = StyleRanges(
    backgrounds=("white", "black", "grey", "tint", "gradient", "noise", "paper"),
    saturation=(0.62, 1.0),
    canvas=(64, 160),
    jpeg_quality=(55, 95),
    jpeg_probability=0.5,
)
#: scenes-resnet's training, validation and test scenes: the training styles and three more background
#: families (coloured clouds, checks, clutter lines). With them its accuracy on the held-out styles
#: rose from 97.9 % to 99.2 %; the captioners, given the same training time, learned more slowly on
#: them and lost accuracy on every split, so they keep TRAINING_STYLE (docs/models.md).
CLASSIFICATION_STYLE = replace(
    TRAINING_STYLE, backgrounds=(*TRAINING_STYLE.backgrounds, "blobs", "checker", "lines")
)
#: Used for the style-shift split only: none of these backgrounds, shades, canvas sizes or JPEG
#: qualities occurs in training.
SHIFTED_STYLE = StyleRanges(
    backgrounds=("radial", "stripes"),
    saturation=(0.5, 0.6),
    canvas=(176, 256),
    jpeg_quality=(35, 50),
    jpeg_probability=1.0,
)


@dataclass(frozen=True)
class Style:
    """One scene's drawing settings."""

    background: str
    saturation: tuple[float, float]
    canvas: int  # px per side before the resize to 64x64
    supersample: int  # 1: aliased edges; 2, 4: anti-aliased
    resample: Image.Resampling  # the filter of the resize to 64x64
    outline: float  # pen width in px at 64x64; 0: no outline
    outline_darkness: float  # the outline's HSV value as a fraction of the fill's
    noise: float  # standard deviation of pixel noise, in levels
    jpeg_quality: int | None  # None: not compressed


def sample_style(rng: np.random.Generator, ranges: StyleRanges) -> Style:
    canvas = int(rng.integers(ranges.canvas[0], ranges.canvas[1] + 1))
    supersample = int(rng.choice([k for k in (1, 2, 4) if canvas * k <= MAX_DRAWING_SIDE]))
    jpeg = None
    if rng.random() < ranges.jpeg_probability:
        jpeg = int(rng.integers(ranges.jpeg_quality[0], ranges.jpeg_quality[1] + 1))
    return Style(
        background=str(rng.choice(ranges.backgrounds)),
        saturation=ranges.saturation,
        canvas=canvas,
        supersample=supersample,
        resample=FILTERS[int(rng.integers(len(FILTERS)))],
        outline=float(rng.uniform(0.5, 1.2)) if rng.random() < 0.5 else 0.0,
        outline_darkness=float(rng.uniform(0.45, 0.75)),
        noise=float(rng.uniform(0.0, 5.0)),
        jpeg_quality=jpeg,
    )


def hsv(hue: float, saturation: float, value: float) -> tuple[int, int, int]:
    """Hue in degrees (any), saturation and value in 0..1 -> 8-bit RGB."""
    r, g, b = colorsys.hsv_to_rgb((hue % 360.0) / 360.0, saturation, value)
    return (round(r * 255), round(g * 255), round(b * 255))


def shade(colour: str, style: Style, rng: np.random.Generator) -> tuple[int, int, int]:
    """A random shade of a named colour, within its hue and value ranges and the style's saturation."""
    return hsv(
        float(rng.uniform(*HUES[colour])),
        float(rng.uniform(*style.saturation)),
        float(rng.uniform(*VALUES[colour])),
    )


def contrasting_shade(
    colour: str, style: Style, under: np.ndarray, rng: np.random.Generator, tries: int = 24
) -> tuple[int, int, int]:
    """A shade that keeps MIN_CONTRAST from `under` (the background's mean RGB under the object);
    the most distant of `tries` shades when none does."""
    best, best_distance = (0, 0, 0), -1.0
    for _ in range(tries):
        fill = shade(colour, style, rng)
        distance = float(np.linalg.norm(np.asarray(fill, float) - under))
        if distance >= MIN_CONTRAST:
            return fill
        if distance > best_distance:
            best, best_distance = fill, distance
    return best


def darker(fill: tuple[int, int, int], fraction: float) -> tuple[int, int, int]:
    """The same hue and saturation at `fraction` of the value: the outline's pen."""
    h, s, v = colorsys.rgb_to_hsv(*(c / 255.0 for c in fill))
    return hsv(h * 360.0, s, v * fraction)


# --- backgrounds ---


def _plain_colour(rng: np.random.Generator) -> np.ndarray:
    """A background colour from the plain families: near white, near black, grey or a pale tint."""
    family = rng.choice(["white", "black", "grey", "tint"])
    return _family_colour(str(family), rng)


def _family_colour(family: str, rng: np.random.Generator) -> np.ndarray:
    if family == "white":
        return rng.uniform(225, 255) + rng.uniform(-6, 6, 3)
    if family == "black":
        return rng.uniform(0, 35) + rng.uniform(-4, 4, 3)
    if family == "grey":
        return rng.uniform(60, 200) + rng.uniform(-5, 5, 3)
    # a tint: any hue, too pale to be taken for a named colour
    return np.asarray(hsv(rng.uniform(0, 360), rng.uniform(0.08, 0.35), rng.uniform(0.3, 1.0)), float)


def _ramp(size: int, rng: np.random.Generator) -> np.ndarray:
    """0..1 along a random direction across the canvas: (size, size)."""
    angle = rng.uniform(0, 2 * np.pi)
    y, x = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    t = (x - 0.5) * np.cos(angle) + (y - 0.5) * np.sin(angle)
    return (t - t.min()) / (t.max() - t.min())


def _smooth_field(size: int, cells: int, rng: np.random.Generator) -> np.ndarray:
    """Low-frequency noise in -1..1: a `cells` x `cells` random grid, upsampled bicubically."""
    grid = Image.fromarray(rng.uniform(0, 255, (cells, cells)).astype(np.uint8), mode="L")
    field = np.asarray(grid.resize((size, size), Image.Resampling.BICUBIC), float)
    return field / 127.5 - 1.0


def paint_background(style: Style, rng: np.random.Generator) -> np.ndarray:
    """The style's background at its canvas size: (canvas, canvas, 3) float in 0..255."""
    size, family = style.canvas, style.background
    if family in ("white", "black", "grey", "tint"):
        image = np.broadcast_to(_family_colour(family, rng), (size, size, 3)).copy()
    elif family == "gradient":
        a, b = _plain_colour(rng), _plain_colour(rng)
        t = _ramp(size, rng)[..., np.newaxis]
        image = a * (1 - t) + b * t
    elif family == "noise":
        base = _plain_colour(rng)
        image = base + rng.normal(0, rng.uniform(8, 28), (size, size, 3))
    elif family == "paper":
        base = np.asarray(hsv(rng.uniform(25, 55), rng.uniform(0.03, 0.15), rng.uniform(0.82, 0.97)), float)
        blotches = _smooth_field(size, int(rng.integers(3, 8)), rng)[..., np.newaxis] * rng.uniform(5, 14)
        grain = rng.normal(0, rng.uniform(2, 6), (size, size, 1))
        image = base + blotches + grain
        for _ in range(int(rng.integers(3, 12))):  # fibres: short faint darker lines
            y, x = rng.integers(0, size, 2)
            length = int(rng.integers(size // 16 + 1, size // 4 + 2))
            if rng.random() < 0.5:
                image[y, x : x + length] -= rng.uniform(8, 20)
            else:
                image[y : y + length, x] -= rng.uniform(8, 20)
    elif family == "blobs":  # coloured low-frequency clouds
        base = _plain_colour(rng)
        cells = int(rng.integers(2, 7))
        field = np.stack([_smooth_field(size, cells, rng) for _ in range(3)], axis=2)
        image = base + field * rng.uniform(10, 30)
    elif family == "checker":  # two plain colours in squares, axis-aligned
        a = _plain_colour(rng)
        mix = rng.uniform(0.2, 0.5)  # b: a mixed with another plain colour
        b = a * (1 - mix) + _plain_colour(rng) * mix
        cell = rng.uniform(5, 14) * size / 64  # px at 64x64
        y, x = np.mgrid[0:size, 0:size] + rng.uniform(0, 2 * cell, (2, 1, 1))
        t = ((np.floor(x / cell) + np.floor(y / cell)) % 2)[..., np.newaxis]
        image = a * (1 - t) + b * t
    elif family == "lines":  # clutter: straight lines in plain colours (never a named one), any direction
        canvas = Image.fromarray(
            np.broadcast_to(_plain_colour(rng), (size, size, 3)).round().astype(np.uint8)
        )
        draw = ImageDraw.Draw(canvas)
        for _ in range(int(rng.integers(4, 14))):
            ends = [tuple(p) for p in rng.uniform(-0.2, 1.2, (2, 2)) * size]
            colour = tuple(int(c) for c in _plain_colour(rng).round())
            draw.line(ends, fill=colour, width=max(1, round(rng.uniform(0.5, 2.0) * size / 64)))
        image = np.asarray(canvas, float)
    elif family == "radial":
        inner, outer = _plain_colour(rng), _plain_colour(rng)
        cy, cx = rng.uniform(0.2, 0.8, 2) * size
        y, x = np.mgrid[0:size, 0:size]
        t = np.clip(np.hypot(x - cx, y - cy) / (size * rng.uniform(0.5, 0.9)), 0, 1)[..., np.newaxis]
        image = inner * (1 - t) + outer * t
    elif family == "stripes":
        a = _plain_colour(rng)
        b = np.clip(a + rng.choice([-1, 1]) * rng.uniform(20, 45), 0, 255)
        period = rng.uniform(6, 16) * size / 64  # px at 64x64
        angle = rng.uniform(0, np.pi)
        y, x = np.mgrid[0:size, 0:size]
        phase = (x * np.cos(angle) + y * np.sin(angle)) * 2 * np.pi / period
        t = (0.5 + 0.5 * np.sin(phase))[..., np.newaxis]
        image = a * (1 - t) + b * t
    else:
        raise ValueError(f"unknown background family {family!r}")
    return np.clip(image, 0, 255)


def finish(image: np.ndarray, style: Style, rng: np.random.Generator) -> np.ndarray:
    """Pixel noise and JPEG compression of a (64, 64, 3) uint8 picture, as the style says."""
    noisy = image.astype(np.float32) + rng.normal(0, style.noise, image.shape).astype(np.float32)
    image = np.clip(np.round(noisy), 0, 255).astype(np.uint8)
    if style.jpeg_quality is None:
        return image
    buffer = io.BytesIO()
    # 4:4:4: chroma subsampling at 2x would smear the colour of a 7-pixel object into its background
    Image.fromarray(image).save(buffer, format="JPEG", quality=style.jpeg_quality, subsampling=0)
    return np.asarray(Image.open(buffer).convert("RGB"))
