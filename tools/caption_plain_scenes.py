"""Caption scenes drawn plainly with Pillow, as another program would draw them: the figures behind
"Beyond our own drawings" in docs/models.md.

.venv/bin/python tools/caption_plain_scenes.py runs/captioner/checkpoint.pt runs/captioner-butd/checkpoint.pt

Two objects side by side or one above the other, in the colours Pillow names `red`, `green`,
`blue` and `yellow`, unrotated, without outline, noise or compression, on a white, a black and a
grey (128) 64x64 background; none of the generator's styles. Each scene is captioned greedily and
counted right when the caption parses into exactly its layout, apart for scenes that hold one of
the held-out colour-shape pairs (what the compositional split asks).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageColor, ImageDraw

from training.caption_decoding import greedy_decode, words
from training.data.scenes import (
    COLOURS,
    HELD_OUT_PAIRS,
    IMAGE_SIZE,
    SHAPES,
    SIZES,
    SceneLayout,
    SceneObject,
    parse_caption,
)
from training.export import load_checkpoint

BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "grey (128)": (128, 128, 128)}
GAP = 6.0  # px between the two objects


@dataclass(frozen=True)
class PlainScene:
    layout: SceneLayout
    radii: tuple[float, ...]  # px
    along: tuple[float, ...]  # each centre along the layout's axis, px
    across: float  # the row's (or column's) line, px


def plain_scene(rng: np.random.Generator) -> PlainScene:
    """Two objects in a row (left to right) or a column (top to bottom)."""
    objects = tuple(
        SceneObject(
            size=str(rng.choice(list(SIZES))),
            colour=str(rng.choice(list(COLOURS))),
            shape=str(rng.choice(SHAPES)),
        )
        for _ in range(2)
    )
    radii = tuple(float(rng.uniform(*SIZES[o.size])) for o in objects)
    slack = IMAGE_SIZE - 4 - 2 * sum(radii) - GAP
    first = 2 + float(rng.uniform(0, slack)) + radii[0]
    return PlainScene(
        layout=SceneLayout(axis=str(rng.choice(["horizontal", "vertical"])), objects=objects),
        radii=radii,
        along=(first, first + radii[0] + GAP + radii[1]),
        across=float(rng.uniform(max(radii) + 4, IMAGE_SIZE - max(radii) - 4)),
    )


def draw(scene: PlainScene, background: tuple[int, int, int]) -> np.ndarray:
    """The scene with Pillow's own primitives: (3, 64, 64) uint8."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), background)
    pen = ImageDraw.Draw(image)
    for obj, r, a in zip(scene.layout.objects, scene.radii, scene.along, strict=True):
        x, y = (a, scene.across) if scene.layout.axis == "horizontal" else (scene.across, a)
        fill = ImageColor.getrgb(obj.colour)
        if obj.shape == "circle":
            pen.ellipse((x - r, y - r, x + r, y + r), fill=fill)
        elif obj.shape == "square":
            half = 0.88 * r
            pen.rectangle((x - half, y - half, x + half, y + half), fill=fill)
        else:
            pen.polygon([(x, y - r), (x + r, y + 0.8 * r), (x - r, y + 0.8 * r)], fill=fill)
    return np.asarray(image).transpose(2, 0, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", type=Path, nargs="+", help="captioner or captioner-butd checkpoints")
    parser.add_argument("--per-background", type=int, default=40, help="scenes per background (default: 40)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the scenes (default: 0)")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    scenes: dict[str, list[tuple[np.ndarray, SceneLayout]]] = {}
    for name, colour in BACKGROUNDS.items():
        drawn = [plain_scene(rng) for _ in range(args.per_background)]
        scenes[name] = [(draw(scene, colour), scene.layout) for scene in drawn]

    models = [(path, load_checkpoint(path)[0]) for path in args.checkpoints]
    header = ["background"]
    for path, _ in models:
        header += [f"{path.parent.name}, seen pairs", f"{path.parent.name}, a held-out pair"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, drawn in scenes.items():
        images = torch.tensor(np.stack([image for image, _ in drawn]))
        held_out = [any(o.pair in HELD_OUT_PAIRS for o in layout.objects) for _, layout in drawn]
        row = [name]
        for _, model in models:
            captions = [words(t, model.config.vocabulary) for t in greedy_decode(model, images)]
            right = [parse_caption(c) == layout for c, (_, layout) in zip(captions, drawn, strict=True)]
            for group in (False, True):
                hits = [r for r, h in zip(right, held_out, strict=True) if h == group]
                row.append(f"{sum(hits)} / {len(hits)}")
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
