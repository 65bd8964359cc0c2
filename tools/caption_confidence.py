"""How sure a captioner is, on scenes it knows and on pictures that are not scenes: the figures
behind the "not recognised" threshold on the mean per-token log-probability (README).

.venv/bin/python tools/caption_confidence.py runs/captioner/checkpoint.pt runs/captioner-butd/checkpoint.pt

For each checkpoint, the best beam-3 caption's mean log-probability per token (log_prob / (words + 1),
as the Caption response's mean_log_prob) on test and style-shift scenes, split into right and
wrong captions, and on pictures without any of the scenes' objects: uniform noise, one plain
colour, a gradient, and scikit-learn's digits enlarged. Prints percentiles and, for a threshold,
the share of each group that falls below it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from training.caption_decoding import beam_search, words
from training.data.scenes import load_scene_split, parse_caption
from training.export import load_checkpoint


def unlike_scenes(count: int, seed: int = 0) -> dict[str, np.ndarray]:
    """(count, 3, 64, 64) uint8 pictures of each kind that holds none of the scenes' objects."""
    from sklearn.datasets import load_digits

    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, (count, 3, 64, 64), dtype=np.uint8)
    plain = np.broadcast_to(rng.integers(0, 256, (count, 3, 1, 1), dtype=np.uint8), (count, 3, 64, 64)).copy()
    ramp = np.linspace(0.0, 1.0, 64)[np.newaxis, :]
    a, b = rng.integers(0, 256, (count, 3, 1, 1)), rng.integers(0, 256, (count, 3, 1, 1))
    gradient = (a + (b - a) * ramp[np.newaxis, np.newaxis] * np.ones((64, 1))).astype(np.uint8)
    digits = load_digits().images[:count]
    enlarged = [
        np.asarray(
            Image.fromarray((255 - d * 16).astype(np.uint8)).resize((64, 64), Image.Resampling.BILINEAR)
        )
        for d in digits
    ]
    digit_rgb = np.repeat(np.stack(enlarged)[:, np.newaxis], 3, axis=1)
    return {"noise": noise, "plain colour": plain, "gradient": gradient, "digits": digit_rgb}


def mean_log_probs(model: torch.nn.Module, images: np.ndarray) -> tuple[list[float], list[str]]:
    """The best beam-3 caption of each image: its mean log-probability per token, and its text."""
    scores, texts = [], []
    for image in torch.tensor(images):
        best = beam_search(model, image, 3)[0]
        scores.append(best.log_prob / (len(best.tokens) + 1))
        texts.append(words(best.tokens, model.config.vocabulary))
    return scores, texts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", type=Path, nargs="+", help="captioner checkpoints")
    parser.add_argument("--count", type=int, default=300, help="images per group (default: 300)")
    parser.add_argument(
        "--threshold", type=float, default=-0.3, help="the threshold to report (default: -0.3)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    for path in args.checkpoints:
        model, checkpoint = load_checkpoint(path)
        groups: dict[str, list[float]] = {}
        for split in ("test", "style-shift"):
            scenes = load_scene_split(split).head(args.count)
            scores, texts = mean_log_probs(model, scenes.images)
            right = [parse_caption(t) == layout for t, layout in zip(texts, scenes.layouts, strict=True)]
            groups[f"{split}, right"] = [s for s, r in zip(scores, right, strict=True) if r]
            groups[f"{split}, wrong"] = [s for s, r in zip(scores, right, strict=True) if not r]
        for name, images in unlike_scenes(args.count).items():
            groups[name] = mean_log_probs(model, images)[0]
        print(f"{checkpoint['model']} ({path}): mean log-probability per token of the best beam-3 caption")
        print(f"| images | n | 1st pct | 5th pct | median | below {args.threshold} |")
        print("|---|---|---|---|---|---|")
        for name, scores in groups.items():
            if not scores:
                print(f"| {name} | 0 | | | | |")
                continue
            p1, p5, p50 = np.percentile(scores, [1, 5, 50])
            below = np.mean(np.asarray(scores) < args.threshold)
            print(f"| {name} | {len(scores)} | {p1:.3f} | {p5:.3f} | {p50:.3f} | {below:.1%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
