"""Train LeNet-5 on scikit-learn's digits, then export and publish it.

The checkpoint kept is the one with the best validation accuracy (ties go to the later
epoch); the test split is only used once, to report that checkpoint's accuracy.
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from tqdm import tqdm

from training.arguments import add_training_arguments, run_arguments
from training.data.digits import load_digit_splits
from training.evaluate import classification_accuracy, predict_logits
from training.models.lenet import LeNet5, LeNetConfig
from training.runs import CURVES_FILE, finish_run, start_run

MODEL_NAME = "lenet5"
DEFAULT_EPOCHS = 150
QUICK_EPOCHS = 8


@dataclass(frozen=True)
class Hyperparameters:
    """Optimiser and augmentation settings; stored in metrics.json with the results."""

    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    max_rotation_deg: float = 15.0
    max_scale_change: float = 0.15  # zoom in or out by up to this fraction
    max_shift_px: float = 3.0  # in the 32x32 input
    stroke_change: float = 0.5  # probability of a thinner (half of it) or thicker (other half) stroke


def augment(images: torch.Tensor, hp: Hyperparameters, generator: torch.Generator) -> torch.Tensor:
    """Random stroke width, rotation, scale and shift per image; uint8 in, uint8 out, like real inputs.

    The stroke width matters for digits drawn with a pen: they reach the model with thinner
    strokes than the scanned training digits, and without it a thin 7 reads as a 2 or a 3.
    """
    n, _, h, w = images.shape
    x = images.float()  # (N, C, H, W)
    u = torch.rand(n, 1, 1, 1, generator=generator)
    thinner = -F.max_pool2d(-x, 3, stride=1, padding=1)  # grey erosion, 3x3
    thicker = F.max_pool2d(x, 3, stride=1, padding=1)  # grey dilation, 3x3
    x = torch.where(u < hp.stroke_change / 2, thinner, torch.where(u < hp.stroke_change, thicker, x))

    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(hp.max_rotation_deg)
    scale = 1 + (torch.rand(n, generator=generator) * 2 - 1) * hp.max_scale_change
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * hp.max_shift_px * 2 / torch.tensor([w, h])
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(  # (N, 2, 3): output -> input sampling coordinates
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    warped = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return warped.round().clamp(0, 255).to(torch.uint8)


def train(
    model: LeNet5,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    images: torch.Tensor,
    labels: torch.Tensor,
    hp: Hyperparameters,
    generator: torch.Generator,
) -> tuple[float, float]:
    """One epoch over augmented, shuffled batches; returns mean loss and accuracy on them."""
    model.train()
    order = torch.randperm(len(labels), generator=generator)
    total_loss, correct = 0.0, 0
    for start in range(0, len(order), hp.batch_size):
        idx = order[start : start + hp.batch_size]
        x, y = augment(images[idx], hp, generator), labels[idx]
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total_loss += loss.item() * len(idx)
        correct += int((logits.argmax(1) == y).sum())
    return total_loss / len(labels), correct / len(labels)


def evaluate(model: LeNet5, images: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor) -> float:
    """Accuracy of the model on un-augmented images."""
    return classification_accuracy(predict_logits(model, images), labels)


def plot_curves(metrics: dict, path: Path) -> None:
    """Loss and accuracy per epoch, for a quick look at a run (no pyplot: no global backend state)."""
    epochs = range(1, len(metrics["train_loss"]) + 1)
    fig = Figure(figsize=(10, 4), layout="tight")
    ax_loss, ax_acc = fig.subplots(1, 2)
    ax_loss.plot(epochs, metrics["train_loss"], label="train (augmented)")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_loss.legend()
    ax_acc.plot(epochs, metrics["train_accuracy"], label="train (augmented)")
    ax_acc.plot(epochs, metrics["val_accuracy"], label="validation")
    ax_acc.axhline(metrics["test_accuracy"], color="grey", linestyle="--", label="test (selected)")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0.8, 1.0))
    ax_acc.legend()
    fig.savefig(path, dpi=100)


def run(
    seed: int = 0,
    epochs: int | None = None,
    run_dir: Path = Path("runs/lenet5"),
    repository: Path | None = Path("models"),
    quick: bool = False,
    progress: bool = True,
    hp: Hyperparameters | None = None,
    threads: int | None = 1,
) -> dict:
    """Train, write checkpoint/metrics/curves into run_dir, publish into repository unless None.

    `threads` sets torch's intra-op threads for the process (None keeps torch's default). One
    thread is the default: LeNet-5's ops are too small to gain from more, results then do not
    depend on the machine's core count, and a shared machine cannot stall the run (with
    several threads, one busy core slowed training several-fold).

    Returns the metrics (as written to metrics.json), with an "export" entry when published.
    """
    hp = hp or Hyperparameters()
    run_dir, epochs, generator = start_run(
        run_dir, seed, epochs, quick, DEFAULT_EPOCHS, QUICK_EPOCHS, threads
    )
    splits = load_digit_splits()
    images, labels = torch.tensor(splits.train.images), torch.tensor(splits.train.labels)

    pixels = images.float() / 255.0
    config = LeNetConfig(mean=float(pixels.mean()), std=float(pixels.std()))
    model = LeNet5(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
    steps = epochs * math.ceil(len(labels) / hp.batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)

    history: dict[str, list[float]] = {"train_loss": [], "train_accuracy": [], "val_accuracy": []}
    best_val, best_epoch, best_state = -1.0, 0, None
    started = time.perf_counter()
    bar = tqdm(range(1, epochs + 1), desc=MODEL_NAME, unit="epoch", disable=not progress)
    for epoch in bar:
        loss, acc = train(model, optimizer, scheduler, images, labels, hp, generator)
        val = evaluate(model, splits.validation.images, splits.validation.labels)
        for key, value in zip(history, (loss, acc, val), strict=True):
            history[key].append(value)
        if val >= best_val:
            best_val, best_epoch, best_state = val, epoch, copy.deepcopy(model.state_dict())
        bar.set_postfix(loss=f"{loss:.3f}", val=f"{val:.3f}", best=f"{best_val:.3f}@{best_epoch}")
    seconds = time.perf_counter() - started

    model.load_state_dict(best_state)
    test = evaluate(model, splits.test.images, splits.test.labels)
    metrics = {
        "model": MODEL_NAME,
        "seed": seed,
        "epochs": epochs,
        "quick": quick,
        "threads": torch.get_num_threads(),
        "hyperparameters": asdict(hp),
        **history,
        "selected_epoch": best_epoch,
        "val_accuracy_selected": best_val,
        "test_accuracy": test,
        "seconds": round(seconds, 2),
    }
    print(f"{MODEL_NAME}: test accuracy {test:.4f} (epoch {best_epoch}, val {best_val:.4f}), {seconds:.1f} s")

    checkpoint = {
        "model": MODEL_NAME,
        "config": asdict(config),
        "state_dict": model.state_dict(),
        "seed": seed,
        "hyperparameters": asdict(hp),
        "metrics": {"test_accuracy": test, "val_accuracy": best_val, "epoch": best_epoch},
    }
    return finish_run(run_dir, checkpoint, metrics, plot_curves, CURVES_FILE, repository)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The trainer's flags; shared with `convserve-train classifier`."""
    add_training_arguments(parser, MODEL_NAME, DEFAULT_EPOCHS, QUICK_EPOCHS, "a few epochs only, for tests")


def run_from_args(args: argparse.Namespace) -> int:
    run(**run_arguments(args))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Train LeNet-5 on scikit-learn's digits and publish it as ONNX."
    )
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
