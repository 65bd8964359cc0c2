"""Train scenes-resnet (the colour and shape of a scene's large object), then export and publish it.

The checkpoint kept is the one with the best validation accuracy; the test splits are only used
once, to report that checkpoint's accuracy on scenes drawn like the training ones (test) and on
scenes drawn in styles that training never uses (style-shift).
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from tqdm import tqdm

from training.arguments import add_training_arguments, run_arguments
from training.data.scenes import CLASS_LABELS, load_classification_split
from training.evaluate import classification_accuracy, predict_logits
from training.models.resnet import ResNet, ResNetConfig
from training.runs import CURVES_FILE, finish_run, start_run

MODEL_NAME = "scenes-resnet"
DEFAULT_EPOCHS = 5
QUICK_EPOCHS = 2
#: Images per split with --quick: enough to learn something, small enough for a test.
QUICK_SIZES = {"train": 1200, "validation": 200, "test": 200, "style-shift": 200}
#: The scenes are the same whatever the training seed, so test accuracies compare across seeds.
DATA_SEED = 0


@dataclass(frozen=True)
class Hyperparameters:
    """Optimiser settings; stored in metrics.json with the results."""

    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal and vertical flips: neither changes which object is the large one."""
    n = len(images)
    flip_x = torch.rand(n, generator=generator) < 0.5
    flip_y = torch.rand(n, generator=generator) < 0.5
    images = torch.where(flip_x.view(-1, 1, 1, 1), images.flip(3), images)
    return torch.where(flip_y.view(-1, 1, 1, 1), images.flip(2), images)


def train_epoch(
    model: ResNet,
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
        x, y = augment(images[idx], generator), labels[idx]
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total_loss += loss.item() * len(idx)
        correct += int((logits.argmax(1) == y).sum())
    return total_loss / len(labels), correct / len(labels)


def plot_curves(metrics: dict, path: Path) -> None:
    """Loss and accuracy per epoch."""
    epochs = range(1, len(metrics["train_loss"]) + 1)
    fig = Figure(figsize=(10, 4), layout="tight")
    ax_loss, ax_acc = fig.subplots(1, 2)
    ax_loss.plot(epochs, metrics["train_loss"], label="train")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_loss.legend()
    ax_acc.plot(epochs, metrics["train_accuracy"], label="train")
    ax_acc.plot(epochs, metrics["val_accuracy"], label="validation")
    ax_acc.axhline(metrics["test_accuracy"], color="grey", linestyle="--", label="test (selected)")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    ax_acc.legend()
    fig.savefig(path, dpi=100)


def run(
    seed: int = 0,
    epochs: int | None = None,
    run_dir: Path = Path("runs") / MODEL_NAME,
    repository: Path | None = Path("models"),
    quick: bool = False,
    progress: bool = True,
    hp: Hyperparameters | None = None,
    threads: int | None = 1,
) -> dict:
    """Train, write checkpoint/metrics/curves into run_dir, publish into repository unless None."""
    hp = hp or Hyperparameters()
    run_dir, epochs, generator = start_run(
        run_dir, seed, epochs, quick, DEFAULT_EPOCHS, QUICK_EPOCHS, threads
    )

    def split(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = load_classification_split(name, DATA_SEED, QUICK_SIZES[name] if quick else None)
        return torch.tensor(images), torch.tensor(labels)

    started = time.perf_counter()
    (images, labels), (val_images, val_labels) = split("train"), split("validation")
    pixels = images.float() / 255.0
    config = ResNetConfig(
        num_classes=len(CLASS_LABELS),
        mean=pixels.mean(dim=(0, 2, 3)).tolist(),
        std=pixels.std(dim=(0, 2, 3)).tolist(),
        instance_norm=True,
    )
    model = ResNet(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
    steps = epochs * math.ceil(len(labels) / hp.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=hp.lr, total_steps=steps)

    history: dict[str, list[float]] = {"train_loss": [], "train_accuracy": [], "val_accuracy": []}
    best_val, best_epoch, best_state = -1.0, 0, None
    bar = tqdm(range(1, epochs + 1), desc=MODEL_NAME, unit="epoch", disable=not progress)
    for epoch in bar:
        loss, acc = train_epoch(model, optimizer, scheduler, images, labels, hp, generator)
        val = classification_accuracy(predict_logits(model, val_images), val_labels)
        for key, value in zip(history, (loss, acc, val), strict=True):
            history[key].append(value)
        if val >= best_val:
            best_val, best_epoch, best_state = val, epoch, copy.deepcopy(model.state_dict())
        bar.set_postfix(loss=f"{loss:.3f}", val=f"{val:.3f}", best=f"{best_val:.3f}@{best_epoch}")
    seconds = time.perf_counter() - started

    model.load_state_dict(best_state)
    test_images, test_labels = split("test")
    test = classification_accuracy(predict_logits(model, test_images), test_labels)
    shifted_images, shifted_labels = split("style-shift")
    shifted = classification_accuracy(predict_logits(model, shifted_images), shifted_labels)
    metrics = {
        "model": MODEL_NAME,
        "seed": seed,
        "epochs": epochs,
        "quick": quick,
        "threads": torch.get_num_threads(),
        "train_images": len(labels),
        "hyperparameters": asdict(hp),
        **history,
        "selected_epoch": best_epoch,
        "val_accuracy_selected": best_val,
        "test_accuracy": test,
        "style_shift_accuracy": shifted,
        "seconds": round(seconds, 2),
    }
    print(
        f"{MODEL_NAME}: test accuracy {test:.4f}, style-shift {shifted:.4f} "
        f"(epoch {best_epoch}, val {best_val:.4f}), {seconds:.1f} s"
    )

    checkpoint = {
        "model": MODEL_NAME,
        "config": asdict(config),
        "state_dict": model.state_dict(),
        "seed": seed,
        "hyperparameters": asdict(hp),
        "metrics": {
            "test_accuracy": test,
            "style_shift_accuracy": shifted,
            "val_accuracy": best_val,
            "epoch": best_epoch,
        },
    }
    return finish_run(run_dir, checkpoint, metrics, plot_curves, CURVES_FILE, repository)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The trainer's flags; shared with `convserve-train scenes-resnet`."""
    add_training_arguments(
        parser, MODEL_NAME, DEFAULT_EPOCHS, QUICK_EPOCHS, "few epochs on a small split, for tests"
    )


def run_from_args(args: argparse.Namespace) -> int:
    run(**run_arguments(args))
    return 0
