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


def add_training_arguments(
    parser: argparse.ArgumentParser, model: str, default_epochs: int, quick_epochs: int, quick_help: str
) -> None:
    """--seed, --epochs, --quick and the output flags, as every trainer has them."""
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help=f"epochs to train (default: {default_epochs}, or {quick_epochs} with --quick)",
    )
    parser.add_argument("--quick", action="store_true", help=f"{quick_help} (default: off)")
    add_output_arguments(parser, model, "checkpoint, metrics and curves")


def run_arguments(args: argparse.Namespace) -> dict:
    """The keyword arguments of a trainer's run() that the shared flags give."""
    return {
        "seed": args.seed,
        "epochs": args.epochs,
        "run_dir": args.run_dir,
        "repository": None if args.no_export else args.repository,
        "quick": args.quick,
        "progress": not args.no_progress,
        "threads": args.threads or None,
    }
