"""What every trainer does at the end of a run: save the checkpoint, plot, write metrics, publish.

Also the run files' names and the seeding, so that all trainers lay out `runs/<model>/` alike.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.json"
CURVES_FILE = "curves.png"


def seed_everything(seed: int) -> torch.Generator:
    """Seed torch and numpy; return the generator that drives shuffling and augmentation."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    return torch.Generator().manual_seed(seed)


def start_run(
    run_dir: Path,
    seed: int,
    epochs: int | None,
    quick: bool,
    default_epochs: int,
    quick_epochs: int,
    threads: int | None,
) -> tuple[Path, int, torch.Generator]:
    """Threads, the epoch count (defaults for a full or a --quick run), the run directory and the seed.

    Returns (run_dir, epochs, the generator that drives shuffling and augmentation).
    """
    if threads is not None:
        torch.set_num_threads(threads)
    if epochs is None:
        epochs = quick_epochs if quick else default_epochs
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir, epochs, seed_everything(seed)


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def finish_run(
    run_dir: Path,
    checkpoint: dict,
    metrics: dict,
    plot: Callable[[dict, Path], None],
    plot_file: str,
    repository: Path | None,
) -> dict:
    """Save the self-describing checkpoint, the plot and metrics.json; export and publish it unless
    `repository` is None (then metrics gains an "export" entry). Returns metrics."""
    path = run_dir / CHECKPOINT_FILE
    torch.save(checkpoint, path)
    plot(metrics, run_dir / plot_file)
    write_json(run_dir / METRICS_FILE, metrics)
    if repository is not None:
        from training.export import export_checkpoint  # onnx and onnxruntime only when exporting

        metrics["export"] = export_checkpoint(path, Path(repository)).as_dict()
        write_json(run_dir / METRICS_FILE, metrics)
    return metrics
