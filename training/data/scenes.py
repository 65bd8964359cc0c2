"""Generated scenes: RGB images of one to three shapes with captions from a small grammar.

Everything is generated from a seed, so there is nothing to download and every split is the
same on every machine. A scene is a row of objects along one axis (left to right or top to
bottom), far enough apart on that axis and close enough on the other that its spatial relation
is never in doubt. Each scene has several reference captions with varied phrasing and word
order; `parse_caption` reads a caption back into the scene's structure, which is how semantic
accuracy is measured (BLEU cannot tell "left" from "right").

Splits: train, validation, test (same distribution), and `compositional`, whose scenes each hold
at least one colour-shape pair that never occurs in training (e.g. a red square).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
SUPERSAMPLE = 4  # drawn at 4x and downsampled: anti-aliased edges, like a real picture
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (210, 45, 45),
    "green": (40, 160, 70),
    "blue": (45, 85, 215),
    "yellow": (225, 195, 40),
}
SHAPES = ("circle", "square", "triangle")
SIZES: dict[str, tuple[float, float]] = {"small": (4.5, 5.5), "large": (9.0, 10.0)}  # radius in px
#: Colour-shape pairs that occur only in the compositional split.
HELD_OUT_PAIRS = frozenset({("red", "square"), ("green", "triangle"), ("blue", "circle")})
AXES = ("horizontal", "vertical")
MIN_GAP = 4.0  # px between neighbouring objects along the axis
MAX_CROSS_OFFSET = 3.0  # px each object may stray from the row's line
MARGIN = 2.0  # px between an object and the image border
DATA_DESCRIPTION = "generated scenes (training/data/scenes.py), 64x64 RGB, 1-3 objects"

SPLIT_SIZES = {"train": 8000, "validation": 1000, "test": 1000, "compositional": 1000}
#: Offsets mixed into the seed so that the splits never share a random stream.
_SPLIT_STREAMS = {"train": 1, "validation": 2, "test": 3, "compositional": 4}


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


def _place(rng: np.random.Generator, radii: list[float]) -> list[float] | None:
    """Centres along the axis with at least MIN_GAP between neighbours; None when they do not fit.

    The room left over is shared out at random before, between and after the objects.
    """
    extent = sum(2 * r for r in radii) + MIN_GAP * (len(radii) - 1)
    slack = IMAGE_SIZE - 2 * MARGIN - extent
    if slack < 0:
        return None
    spare = slack * rng.dirichlet(np.ones(len(radii) + 1))
    centres, position = [], MARGIN
    for r, extra in zip(radii, spare, strict=False):  # the last share is the room after the row
        start = position + float(extra)
        centres.append(start + r)
        position = start + 2 * r + MIN_GAP
    return centres


def _draw(draw: ImageDraw.ImageDraw, obj: SceneObject, x: float, y: float, r: float, fill: tuple) -> None:
    s = SUPERSAMPLE
    x, y, r = x * s, y * s, r * s
    if obj.shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    elif obj.shape == "square":
        half = r * 0.88  # a square as big to the eye as a circle of radius r
        draw.rectangle((x - half, y - half, x + half, y + half), fill=fill)
    else:
        draw.polygon([(x, y - r), (x + r, y + r * 0.8), (x - r, y + r * 0.8)], fill=fill)


def render(layout: SceneLayout, rng: np.random.Generator) -> np.ndarray:
    """Draw a layout with random positions, exact sizes and colours jittered: (3, H, W) uint8."""
    if not fits(layout.objects):
        raise ValueError(f"{len(layout.objects)} objects of these sizes do not fit in a row")
    radii = [float(rng.uniform(*SIZES[o.size])) for o in layout.objects]
    centres = _place(rng, radii)
    assert centres is not None, "fits() guarantees room at the largest sizes"
    reach = max(radii) + MAX_CROSS_OFFSET + MARGIN
    line = float(rng.uniform(reach, IMAGE_SIZE - reach))
    background = tuple(int(v) for v in rng.integers(205, 245, 3))
    canvas = Image.new("RGB", (IMAGE_SIZE * SUPERSAMPLE,) * 2, background)
    draw = ImageDraw.Draw(canvas)
    for obj, along, r in zip(layout.objects, centres, radii, strict=True):
        cross = line + float(rng.uniform(-MAX_CROSS_OFFSET, MAX_CROSS_OFFSET))
        x, y = (along, cross) if layout.axis == "horizontal" else (cross, along)
        fill = tuple(int(np.clip(c + rng.integers(-18, 19), 0, 255)) for c in COLOURS[obj.colour])
        _draw(draw, obj, x, y, r, fill)
    image = np.asarray(canvas.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX), dtype=np.int16)
    noise = rng.normal(0, 3.0, image.shape).round().astype(np.int16)
    return np.clip(image + noise, 0, 255).astype(np.uint8).transpose(2, 0, 1)


def make_scene(rng: np.random.Generator, split: str = "train", references: int = 5) -> Scene:
    """One scene: layout, image and `references` captions drawn from the grammar's variants."""
    count = int(rng.integers(1, 4))
    layout = SceneLayout(
        str(rng.choice(AXES)) if count > 1 else "horizontal", _sample_objects(rng, count, split)
    )
    image = render(layout, rng)
    everything, canonical = caption_variants(layout)
    picks = rng.choice(len(everything), size=min(references, len(everything)), replace=False)
    return Scene(layout, image, tuple(everything[i] for i in sorted(picks)), tuple(canonical))


@dataclass(frozen=True)
class SceneSplit:
    images: np.ndarray  # (N, 3, H, W) uint8
    layouts: tuple[SceneLayout, ...]
    captions: tuple[tuple[str, ...], ...]  # references per image
    canonical: tuple[tuple[str, ...], ...]  # reading-order captions per image (training targets)


def generate_split(split: str, count: int, seed: int = 0) -> SceneSplit:
    """`count` scenes of a split; the same seed, split and count always give the same scenes."""
    if split not in _SPLIT_STREAMS:
        raise ValueError(f"unknown split {split!r}; splits: {', '.join(_SPLIT_STREAMS)}")
    rng = np.random.default_rng([seed, _SPLIT_STREAMS[split]])
    scenes = [make_scene(rng, split) for _ in range(count)]
    images = np.stack([s.image for s in scenes])
    images.setflags(write=False)
    return SceneSplit(
        images=images,
        layouts=tuple(s.layout for s in scenes),
        captions=tuple(s.captions for s in scenes),
        canonical=tuple(s.canonical for s in scenes),
    )


@lru_cache(maxsize=8)
def load_scene_split(split: str, seed: int = 0, count: int | None = None) -> SceneSplit:
    """A cached split at its standard size (SPLIT_SIZES) unless `count` says otherwise."""
    return generate_split(split, SPLIT_SIZES[split] if count is None else count, seed)


# --- the classification task of scenes-resnet ---

#: scenes-resnet's classes: the colour and shape of the scene's one large object.
CLASS_LABELS = tuple(f"{colour} {shape}" for colour in COLOURS for shape in SHAPES)
CLASSIFICATION_SIZES = {"train": 12000, "validation": 1000, "test": 2000}


def make_classification_scene(rng: np.random.Generator) -> tuple[np.ndarray, int]:
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
    return render(layout, rng), label


@lru_cache(maxsize=4)
def load_classification_split(
    split: str, seed: int = 0, count: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 3, 64, 64) uint8, labels (N,) int64) for scenes-resnet, deterministic by seed."""
    if split not in CLASSIFICATION_SIZES:
        raise ValueError(f"unknown split {split!r}; splits: {', '.join(CLASSIFICATION_SIZES)}")
    rng = np.random.default_rng([seed, 100 + list(CLASSIFICATION_SIZES).index(split)])
    n = CLASSIFICATION_SIZES[split] if count is None else count
    pairs = [make_classification_scene(rng) for _ in range(n)]
    images = np.stack([p[0] for p in pairs])
    labels = np.array([p[1] for p in pairs], dtype=np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels
