"""Generated scenes: RGB images of one to three shapes with captions from a small grammar.

Everything is generated from a seed, so there is nothing to download and every split is the
same on every machine. A scene is a row of objects along one axis (left to right or top to
bottom), far enough apart on that axis and close enough on the other that its spatial relation
is never in doubt. Each scene has several reference captions with varied phrasing and word
order; `parse_caption` reads a caption back into the scene's structure, which is how semantic
accuracy is measured (BLEU cannot tell "left" from "right").

Every scene is drawn in its own style (training/data/styles.py: background, shades, pen,
resolution, compression), so that models learn the objects rather than one way of drawing them;
the generator knows each object's box, which the bottom-up captioner's region detector learns from.

Splits: train, validation, test (same distribution), `compositional`, whose scenes each hold at
least one colour-shape pair that never occurs in training (e.g. a red square), and `style-shift`,
the training distribution of objects drawn in styles that training never uses (`SHIFTED_STYLE`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from training.data.styles import (
    CLASSIFICATION_STYLE,
    MAX_ROTATION,
    SHIFTED_STYLE,
    TRAINING_STYLE,
    Style,
    StyleRanges,
    contrasting_shade,
    darker,
    finish,
    paint_background,
    sample_style,
)

IMAGE_SIZE = 64
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (210, 45, 45),
    "green": (40, 160, 70),
    "blue": (45, 85, 215),
    "yellow": (225, 195, 40),
}
SHAPES = ("circle", "square", "triangle")
SIZES: dict[str, tuple[float, float]] = {"small": (3.5, 5.5), "large": (8.0, 10.0)}  # radius in px
#: Colour-shape pairs that occur only in the compositional split.
HELD_OUT_PAIRS = frozenset({("red", "square"), ("green", "triangle"), ("blue", "circle")})
AXES = ("horizontal", "vertical")
MIN_GAP = 4.0  # px between neighbouring objects along the axis
MAX_CROSS_OFFSET = 3.0  # px each object may stray from the row's line
MARGIN = 2.0  # px between an object and the image border
DATA_DESCRIPTION = "generated scenes (training/data/scenes.py), 64x64 RGB, 1-3 objects, varied styles"

SPLIT_SIZES = {"train": 8000, "validation": 1000, "test": 1000, "compositional": 1000, "style-shift": 1000}
#: The test splits every evaluation reports, beside each other.
TEST_SPLITS = ("test", "compositional", "style-shift")
#: Offsets mixed into the seed so that the splits never share a random stream.
_SPLIT_STREAMS = {"train": 1, "validation": 2, "test": 3, "compositional": 4, "style-shift": 5}


def split_style(split: str) -> StyleRanges:
    """The drawing styles of a split: the held-out ones for style-shift, the training ones otherwise."""
    return SHIFTED_STYLE if split == "style-shift" else TRAINING_STYLE


@dataclass(frozen=True)
class SceneObject:
    size: str
    colour: str
    shape: str

    @property
    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.shape}"

    @property
    def pair(self) -> tuple[str, str]:
        return (self.colour, self.shape)


@dataclass(frozen=True)
class SceneLayout:
    """What a caption must say: the objects in reading order (left to right, or top to bottom)."""

    axis: str  # "horizontal" or "vertical"; a single object has no axis and uses "horizontal"
    objects: tuple[SceneObject, ...]


@dataclass(frozen=True)
class Scene:
    layout: SceneLayout
    image: np.ndarray  # (3, H, W) uint8
    captions: tuple[str, ...]  # references, varied phrasing and order
    canonical: tuple[str, ...]  # the references that name the objects in reading order
    boxes: np.ndarray  # (objects, 4) float32 x0, y0, x1, y1 in pixels, in layout order


# --- the grammar ---

_BEFORE = {"horizontal": ("to the left of", "left of", "on the left of"), "vertical": ("above", "over")}
_AFTER = {"horizontal": ("to the right of", "right of", "on the right of"), "vertical": ("below", "under")}
_FORWARD = {"horizontal": "from left to right", "vertical": "from top to bottom"}
_BACKWARD = {"horizontal": "from right to left", "vertical": "from bottom to top"}


def caption_variants(layout: SceneLayout) -> tuple[list[str], list[str]]:
    """Every caption the grammar allows for a layout: (all of them, those in reading order)."""
    objects = layout.objects
    phrases = [o.phrase for o in objects]
    if len(objects) == 1:
        forms = [phrases[0], f"there is {phrases[0]}", f"{phrases[0]} on its own"]
        return forms, forms
    if len(objects) == 2:
        first, second = phrases
        forward = [f"{first} {rel} {second}" for rel in _BEFORE[layout.axis]]
        forward += [f"there is {first} {rel} {second}" for rel in _BEFORE[layout.axis][:1]]
        backward = [f"{second} {rel} {first}" for rel in _AFTER[layout.axis]]
        backward += [f"there is {second} {rel} {first}" for rel in _AFTER[layout.axis][:1]]
        return forward + backward, forward
    listed = f"{', '.join(phrases[:-1])} and {phrases[-1]}"
    reversed_listed = f"{', '.join(phrases[:0:-1])} and {phrases[0]}"
    forward = [f"{listed} {_FORWARD[layout.axis]}", f"{_FORWARD[layout.axis]}: {listed}"]
    backward = [f"{reversed_listed} {_BACKWARD[layout.axis]}", f"{_BACKWARD[layout.axis]}: {reversed_listed}"]
    return forward + backward, forward


@lru_cache(maxsize=1)
def grammar_limits() -> tuple[int, int]:
    """(words in the grammar's longest caption, the most times any caption says one word).

    Every object phrase has the same number of words, and a caption repeats a word most when its
    objects are all alike, so layouts of one repeated object of each count and axis cover both.
    """
    from training.caption_metrics import tokenize  # the tokens a captioner is trained on

    obj = SceneObject("small", "red", "circle")
    longest = repeats = 0
    for count in (1, 2, 3):
        for axis in AXES:
            for caption in caption_variants(SceneLayout(axis, (obj,) * count))[0]:
                words = tokenize(caption)
                longest = max(longest, len(words))
                repeats = max(repeats, max(words.count(word) for word in words))
    return longest, repeats


_OBJECT = re.compile(rf"\ba ({'|'.join(SIZES)}) ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})\b")
_RELATIONS = {
    "left": ("horizontal", True),
    "right": ("horizontal", False),
    "above": ("vertical", True),
    "over": ("vertical", True),
    "below": ("vertical", False),
    "under": ("vertical", False),
}
_ORDERS = {
    ("left", "right"): ("horizontal", True),
    ("right", "left"): ("horizontal", False),
    ("top", "bottom"): ("vertical", True),
    ("bottom", "top"): ("vertical", False),
}


def parse_caption(caption: str) -> SceneLayout | None:
    """Read a caption back into a layout with the grammar; None when it is not a sentence of it."""
    text = " ".join(re.findall(r"[a-z]+", caption.lower()))
    objects = [SceneObject(*m.groups()) for m in _OBJECT.finditer(text)]
    skeleton = _OBJECT.sub("OBJ", text)
    if len(objects) == 1:
        if skeleton in ("OBJ", "there is OBJ", "OBJ on its own"):
            return SceneLayout("horizontal", tuple(objects))
        return None
    if len(objects) == 2:
        match = re.fullmatch(r"(?:there is )?OBJ (?:is )?(?:to |on )?(?:the )?(\w+)(?: of)? OBJ", skeleton)
        if not match or match.group(1) not in _RELATIONS:
            return None
        axis, in_order = _RELATIONS[match.group(1)]
        return SceneLayout(axis, tuple(objects if in_order else objects[::-1]))
    if len(objects) == 3:
        match = re.fullmatch(
            r"OBJ OBJ and OBJ from (\w+) to (\w+)|from (\w+) to (\w+) OBJ OBJ and OBJ", skeleton
        )
        if not match:
            return None
        words = tuple(w for w in match.groups() if w)
        if words not in _ORDERS:
            return None
        axis, in_order = _ORDERS[words]
        return SceneLayout(axis, tuple(objects if in_order else objects[::-1]))
    return None


# --- sampling and drawing ---


def _sample_objects(rng: np.random.Generator, count: int, split: str) -> tuple[SceneObject, ...]:
    """Objects whose colour-shape pairs suit the split (held-out pairs only in `compositional`)."""
    while True:
        objects = tuple(
            SceneObject(
                size=str(rng.choice(list(SIZES))),
                colour=str(rng.choice(list(COLOURS))),
                shape=str(rng.choice(SHAPES)),
            )
            for _ in range(count)
        )
        held_out = [o.pair in HELD_OUT_PAIRS for o in objects]
        if (split == "compositional") == any(held_out) and fits(objects):
            return objects


def fits(objects: tuple[SceneObject, ...]) -> bool:
    """Whether the objects fit in a row at their largest sizes (three large ones do not)."""
    extent = sum(2 * SIZES[o.size][1] for o in objects) + MIN_GAP * (len(objects) - 1)
    return extent <= IMAGE_SIZE - 2 * MARGIN


def _place(rng: np.random.Generator, extents: list[tuple[float, float]]) -> list[float] | None:
    """Centres along the axis with at least MIN_GAP between neighbours; None when they do not fit.

    `extents` are each object's reach before and after its centre along the axis. The room left
    over is shared out at random before, between and after the objects.
    """
    extent = sum(before + after for before, after in extents) + MIN_GAP * (len(extents) - 1)
    slack = IMAGE_SIZE - 2 * MARGIN - extent
    if slack < 0:
        return None
    spare = slack * rng.dirichlet(np.ones(len(extents) + 1))
    centres, position = [], MARGIN
    for (before, after), extra in zip(extents, spare, strict=False):  # the last share is the room after
        centre = position + float(extra) + before
        centres.append(centre)
        position = centre + after + MIN_GAP
    return centres


def _corners(shape: str, r: float, angle: float) -> np.ndarray:
    """The outline of a square or triangle of radius r rotated by `angle` degrees: (P, 2) x, y
    relative to the centre (y down); a circle's four extreme points."""
    if shape == "circle":
        return np.array([(-r, 0.0), (r, 0.0), (0.0, -r), (0.0, r)])
    if shape == "square":
        half = r * 0.88  # a square as big to the eye as a circle of radius r
        points = np.array([(-half, -half), (half, -half), (half, half), (-half, half)])
    else:
        points = np.array([(0.0, -r), (r, r * 0.8), (-r, r * 0.8)])
    theta = np.radians(angle)
    rotation = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    return points @ rotation.T


@dataclass(frozen=True)
class Drawing:
    image: np.ndarray  # (3, H, W) uint8
    boxes: np.ndarray  # (objects, 4) float32: x0, y0, x1, y1 in pixels of the image, in layout order


def render(
    layout: SceneLayout, rng: np.random.Generator, style: Style | StyleRanges = TRAINING_STYLE
) -> Drawing:
    """Draw a layout: random sizes within each size word, rotations, positions and shades, in a
    style sampled from `style` (or exactly that style)."""
    if not fits(layout.objects):
        raise ValueError(f"{len(layout.objects)} objects of these sizes do not fit in a row")
    if isinstance(style, StyleRanges):
        style = sample_style(rng, style)
    along_axis = 0 if layout.axis == "horizontal" else 1
    for _ in range(1000):  # rotated squares and triangles reach further: draw again until they fit
        radii = [float(rng.uniform(*SIZES[o.size])) for o in layout.objects]
        angles = [
            0.0 if o.shape == "circle" else float(rng.uniform(-MAX_ROTATION, MAX_ROTATION))
            for o in layout.objects
        ]
        outlines = [_corners(o.shape, r, a) for o, r, a in zip(layout.objects, radii, angles, strict=True)]
        low = [points.min(axis=0) for points in outlines]  # (x, y) reach before the centre, negative
        high = [points.max(axis=0) for points in outlines]
        centres = _place(rng, [(-lo[along_axis], hi[along_axis]) for lo, hi in zip(low, high, strict=True)])
        if centres is not None:
            break
    else:
        raise RuntimeError("no placement found in 1000 draws")
    across = 1 - along_axis
    first = max(-lo[across] for lo in low) + MAX_CROSS_OFFSET + MARGIN
    last = IMAGE_SIZE - max(hi[across] for hi in high) - MAX_CROSS_OFFSET - MARGIN
    line = float(rng.uniform(first, last))
    positions = []
    for along in centres:
        cross = line + float(rng.uniform(-MAX_CROSS_OFFSET, MAX_CROSS_OFFSET))
        positions.append((along, cross) if layout.axis == "horizontal" else (cross, along))
    boxes = np.array(
        [
            (x + lo[0], y + lo[1], x + hi[0], y + hi[1])
            for (x, y), lo, hi in zip(positions, low, high, strict=True)
        ],
        dtype=np.float32,
    )

    background = paint_background(style, rng)  # (S, S, 3) at the canvas size
    scale = style.canvas / IMAGE_SIZE
    side = style.canvas * style.supersample
    canvas = Image.fromarray(background.round().astype(np.uint8))
    if style.supersample > 1:
        canvas = canvas.resize((side, side), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(canvas)
    pen = max(1, round(style.outline * scale * style.supersample)) if style.outline else 0
    for obj, (x, y), r, points, box in zip(layout.objects, positions, radii, outlines, boxes, strict=True):
        x0, y0, x1, y1 = np.clip(np.round(box * scale).astype(int), 0, style.canvas)
        under = background[y0 : max(y1, y0 + 1), x0 : max(x1, x0 + 1)].reshape(-1, 3).mean(axis=0)
        fill = contrasting_shade(obj.colour, style, under, rng)
        outline = darker(fill, style.outline_darkness) if pen else None
        k = scale * style.supersample  # 64x64 pixels -> drawing pixels
        if obj.shape == "circle":
            draw.ellipse(
                ((x - r) * k, (y - r) * k, (x + r) * k, (y + r) * k), fill=fill, outline=outline, width=pen
            )
        else:
            corners = [((x + px) * k, (y + py) * k) for px, py in points]
            draw.polygon(corners, fill=fill, outline=outline, width=pen)
    if style.supersample > 1:
        canvas = canvas.resize((style.canvas, style.canvas), Image.Resampling.BOX)
    if style.canvas != IMAGE_SIZE:
        canvas = canvas.resize((IMAGE_SIZE, IMAGE_SIZE), style.resample)
    image = finish(np.asarray(canvas), style, rng)
    return Drawing(image.transpose(2, 0, 1).copy(), boxes)


def make_scene(
    rng: np.random.Generator, split: str = "train", references: int = 5, style: StyleRanges = TRAINING_STYLE
) -> Scene:
    """One scene: layout, image and `references` captions drawn from the grammar's variants."""
    count = int(rng.integers(1, 4))
    layout = SceneLayout(
        str(rng.choice(AXES)) if count > 1 else "horizontal", _sample_objects(rng, count, split)
    )
    drawing = render(layout, rng, style)
    everything, canonical = caption_variants(layout)
    picks = rng.choice(len(everything), size=min(references, len(everything)), replace=False)
    return Scene(
        layout, drawing.image, tuple(everything[i] for i in sorted(picks)), tuple(canonical), drawing.boxes
    )


@dataclass(frozen=True)
class SceneSplit:
    images: np.ndarray  # (N, 3, H, W) uint8
    layouts: tuple[SceneLayout, ...]
    captions: tuple[tuple[str, ...], ...]  # references per image
    canonical: tuple[tuple[str, ...], ...]  # reading-order captions per image (training targets)
    boxes: tuple[np.ndarray, ...]  # per image: (objects, 4) float32 x0, y0, x1, y1, in layout order

    def head(self, count: int) -> SceneSplit:
        """The first `count` scenes."""
        return SceneSplit(
            self.images[:count],
            self.layouts[:count],
            self.captions[:count],
            self.canonical[:count],
            self.boxes[:count],
        )


def generate_split(split: str, count: int, seed: int = 0, progress: bool = False) -> SceneSplit:
    """`count` scenes of a split; the same seed, split and count always give the same scenes (and
    the first n of a larger count are the n of a smaller one)."""
    if split not in _SPLIT_STREAMS:
        raise ValueError(f"unknown split {split!r}; splits: {', '.join(_SPLIT_STREAMS)}")
    rng = np.random.default_rng([seed, _SPLIT_STREAMS[split]])
    drawing = tqdm(range(count), desc=f"drawing {split} scenes", unit="scene", disable=not progress)
    scenes = [make_scene(rng, split, style=split_style(split)) for _ in drawing]
    images = np.stack([s.image for s in scenes])
    images.setflags(write=False)
    return SceneSplit(
        images=images,
        layouts=tuple(s.layout for s in scenes),
        captions=tuple(s.captions for s in scenes),
        canonical=tuple(s.canonical for s in scenes),
        boxes=tuple(s.boxes for s in scenes),
    )


@lru_cache(maxsize=8)
def load_scene_split(
    split: str, seed: int = 0, count: int | None = None, progress: bool = False
) -> SceneSplit:
    """A cached split at its standard size (SPLIT_SIZES) unless `count` says otherwise."""
    return generate_split(split, SPLIT_SIZES[split] if count is None else count, seed, progress)


# --- the classification task of scenes-resnet ---

#: scenes-resnet's classes: the colour and shape of the scene's one large object.
CLASS_LABELS = tuple(f"{colour} {shape}" for colour in COLOURS for shape in SHAPES)
CLASSIFICATION_SIZES = {"train": 12000, "validation": 1000, "test": 2000, "style-shift": 2000}


def make_classification_scene(
    rng: np.random.Generator, style: StyleRanges = TRAINING_STYLE
) -> tuple[np.ndarray, int]:
    """A scene with exactly one large object among one to three; label: that object's colour and shape."""
    count = int(rng.integers(1, 4))
    large = int(rng.integers(count))  # one large and two small always fit
    objects = tuple(
        SceneObject(
            size="large" if i == large else "small",
            colour=str(rng.choice(list(COLOURS))),
            shape=str(rng.choice(SHAPES)),
        )
        for i in range(count)
    )
    layout = SceneLayout(str(rng.choice(AXES)), objects)
    label = CLASS_LABELS.index(f"{objects[large].colour} {objects[large].shape}")
    return render(layout, rng, style).image, label


@lru_cache(maxsize=4)
def load_classification_split(
    split: str, seed: int = 0, count: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 3, 64, 64) uint8, labels (N,) int64) for scenes-resnet, deterministic by seed."""
    if split not in CLASSIFICATION_SIZES:
        raise ValueError(f"unknown split {split!r}; splits: {', '.join(CLASSIFICATION_SIZES)}")
    rng = np.random.default_rng([seed, 100 + list(CLASSIFICATION_SIZES).index(split)])
    n = CLASSIFICATION_SIZES[split] if count is None else count
    style = SHIFTED_STYLE if split == "style-shift" else CLASSIFICATION_STYLE
    pairs = [make_classification_scene(rng, style) for _ in range(n)]
    images = np.stack([p[0] for p in pairs])
    labels = np.array([p[1] for p in pairs], dtype=np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels
