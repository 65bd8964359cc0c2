"""Draw test scenes with the captions a trained captioner gives them (beam 3), for the README.

.venv/bin/python tools/caption_examples.py runs/captioner/checkpoint.pt docs/captioner-examples.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from matplotlib.figure import Figure

from training.caption_decoding import beam_search, words
from training.data.scenes import load_scene_split, parse_caption
from training.export import load_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="a captioner checkpoint (runs/captioner/checkpoint.pt)")
    parser.add_argument("output", type=Path, help="the PNG to write")
    parser.add_argument("--split", default="test", help="test or compositional (default: test)")
    parser.add_argument("--count", type=int, default=8, help="scenes to draw (default: 8)")
    args = parser.parse_args(argv)

    model, _ = load_checkpoint(args.checkpoint)
    split = load_scene_split(args.split)
    columns = 4
    rows = -(-args.count // columns)
    fig = Figure(figsize=(4 * columns, 4.6 * rows), layout="tight")
    for i, ax in enumerate(fig.subplots(rows, columns).flat):
        ax.axis("off")
        if i >= args.count:
            continue
        best = beam_search(model, torch.tensor(split.images[i]), 3)[0]
        caption = words(best.tokens, model.config.vocabulary)
        right = parse_caption(caption) == split.layouts[i]
        ax.imshow(split.images[i].transpose(1, 2, 0))
        ax.set_title(_wrap(caption) + ("" if right else "\n(wrong)"), fontsize=10)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output, dpi=80)
    print(f"wrote {args.output}")
    return 0


def _wrap(text: str, width: int = 34) -> str:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join([*lines, line])


if __name__ == "__main__":
    raise SystemExit(main())
