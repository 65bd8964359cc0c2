"""Flags every trainer shares: where a run writes, where it publishes, threads and progress."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_output_arguments(parser: argparse.ArgumentParser, model: str, run_contents: str) -> None:
    """--run-dir, --repository, --no-export, --threads, --no-progress, with the model's defaults."""
    parser.add_argument(
        "--run-dir",
        type=Path,
        default=Path("runs") / model,
        help=f"{run_contents} (default: runs/{model})",
    )
    parser.add_argument(
        "--repository",
        type=Path,
        default=Path("models"),
        help="model repository to publish into (default: models)",
    )
    parser.add_argument(
        "--no-export", action="store_true", help="train only; do not export or publish (default: off)"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads; 0 keeps torch's default (default: 1)"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar (default: off)")
