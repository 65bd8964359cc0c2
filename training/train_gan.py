"""Train the label-conditional DCGAN on scikit-learn's digits, then export and publish it.

GAN quality swings from one checkpoint to the next and the losses do not show it, so the
generator is judged every few epochs by a separately trained LeNet-5 (never by its own
discriminator) and the checkpoint shipped is chosen by SELECTION_RULE.
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.image import imsave
from tqdm import tqdm

from training import train_classifier
from training.arguments import add_output_arguments
from training.data.digits import DigitSplits, load_digit_splits
from training.evaluate import generator_quality
from training.models.dcgan import (
    DCGANConfig,
    Discriminator,
    Generator,
    discriminator_loss,
    generator_loss,
    to_uint8,
)
from training.models.lenet import LeNet5, LeNetConfig
from training.runs import CHECKPOINT_FILE, finish_run, seed_everything

MODEL_NAME = "dcgan"
DEFAULT_EPOCHS = 220  # FID was still falling at 110 epochs; ~13 min on one core
QUICK_EPOCHS = 2
DEFAULT_EVAL_EVERY = 5
#: Images per class in the periodic evaluations and in the final one of the shipped checkpoint.
EVAL_PER_CLASS = 100
FINAL_PER_CLASS = 200
MIN_DIVERSITY = 0.8
MIN_LABEL_ACCURACY = 0.98
SELECTION_RULE = (
    f"lowest FID among evaluated checkpoints with label accuracy >= {MIN_LABEL_ACCURACY} and diversity "
    f"ratio >= {MIN_DIVERSITY} (if none qualifies: the highest label accuracy, then the lowest FID)"
)
LOSSES_FILE = "losses.png"
SAMPLES_DIR = "samples"
BEST_GRID_FILE = "samples_selected.png"
GRID_COLUMNS = 10


@dataclass(frozen=True)
class Hyperparameters:
    """Optimiser settings from the DCGAN paper; stored in metrics.json with the results."""

    batch_size: int = 64
    lr: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> floats in [-1, 1], the range of the generator's tanh."""
    return images.float() / 127.5 - 1.0


def train(
    generator: Generator,
    discriminator: Discriminator,
    g_optimizer: torch.optim.Optimizer,
    d_optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    hp: Hyperparameters,
    rng: torch.Generator,
) -> dict[str, float]:
    """One epoch of alternating updates: D on a real and a fake batch, then G (non-saturating loss).

    Returns the epoch's mean losses and mean D(real), D(fake) probabilities.
    """
    generator.train()
    discriminator.train()
    order = torch.randperm(len(labels), generator=rng)
    sums = {"d_loss": 0.0, "g_loss": 0.0, "d_real": 0.0, "d_fake": 0.0}
    for start in range(0, len(order), hp.batch_size):
        idx = order[start : start + hp.batch_size]
        real, y = to_unit_range(images[idx]), labels[idx]  # (B, 1, 32, 32), (B,)
        z = torch.randn(len(idx), generator.config.latent_size, generator=rng)
        fake = generator(z, y)

        real_logits, fake_logits = discriminator(real, y), discriminator(fake.detach(), y)
        d_loss = discriminator_loss(real_logits, fake_logits)
        d_optimizer.zero_grad(set_to_none=True)
        d_loss.backward()
        d_optimizer.step()

        g_loss = generator_loss(discriminator(fake, y))
        g_optimizer.zero_grad(set_to_none=True)
        g_loss.backward()
        g_optimizer.step()

        n = len(idx)
        sums["d_loss"] += d_loss.item() * n
        sums["g_loss"] += g_loss.item() * n
        sums["d_real"] += float(torch.sigmoid(real_logits.detach()).sum())
        sums["d_fake"] += float(torch.sigmoid(fake_logits.detach()).sum())
    return {key: value / len(labels) for key, value in sums.items()}


@torch.no_grad()
def generate(
    generator: Generator, z: torch.Tensor, labels: torch.Tensor, batch_size: int = 500
) -> np.ndarray:
    """uint8 images (N, C, 32, 32) in eval mode (running batch-norm statistics), as exported."""
    was_training = generator.training
    generator.eval()
    out = [
        to_uint8(generator(z[i : i + batch_size], labels[i : i + batch_size]))
        for i in range(0, len(z), batch_size)
    ]
    generator.train(was_training)
    return torch.cat(out).numpy()


def evaluate(
    generator: Generator, classifier: LeNet5, splits: DigitSplits, per_class: int, seed: int
) -> dict[str, float]:
    """Quality of `per_class` generated digits per class (latents from `seed`): see generator_quality."""
    num_classes = generator.config.num_classes
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    z = torch.randn(len(labels), generator.config.latent_size, generator=torch.Generator().manual_seed(seed))
    images = generate(generator, z, labels)
    return generator_quality(
        classifier, images, labels.numpy(), splits.train.images, splits.train.labels, splits.test.images
    )


def selection_key(quality: dict[str, float]) -> tuple[bool, float, float]:
    """SELECTION_RULE as a sort key: larger is better.

    Label accuracy alone keeps rising while the images drift from the real digits (FID up); among
    checkpoints that are good enough on labels and diversity, the closest to real digits wins.
    """
    labels_ok = quality["label_accuracy"] >= MIN_LABEL_ACCURACY
    if labels_ok and quality["diversity_ratio"] >= MIN_DIVERSITY:
        return True, -quality["fid"], quality["label_accuracy"]
    return False, quality["label_accuracy"], -quality["fid"]


def fixed_grid_inputs(config: DCGANConfig, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One latent per column, reused on every row (one row per class) and at every epoch."""
    z = torch.randn(GRID_COLUMNS, config.latent_size, generator=torch.Generator().manual_seed(seed + 1))
    labels = torch.arange(config.num_classes).repeat_interleave(GRID_COLUMNS)
    return z.repeat(config.num_classes, 1), labels


def save_grid(images: np.ndarray, rows: int, path: Path) -> None:
    """Tile (rows * cols, 1, H, W) uint8 images into one grayscale PNG, a 1-pixel gap between them."""
    n, _, h, w = images.shape
    cols = n // rows
    canvas = np.full((rows * (h + 1) + 1, cols * (w + 1) + 1), 64, dtype=np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, cols)
        canvas[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + c * (w + 1) : 1 + c * (w + 1) + w] = image[0]
    imsave(path, canvas, cmap="gray", vmin=0, vmax=255)


def plot_losses(metrics: dict, path: Path) -> None:
    """Losses and D's outputs per epoch, and the periodic quality measurements (no pyplot)."""
    epochs = range(1, len(metrics["d_loss"]) + 1)
    fig = Figure(figsize=(15, 4), layout="tight")
    ax_loss, ax_d, ax_q = fig.subplots(1, 3)
    ax_loss.plot(epochs, metrics["d_loss"], label="D")
    ax_loss.plot(epochs, metrics["g_loss"], label="G (non-saturating)")
    ax_loss.set(xlabel="epoch", ylabel="binary cross-entropy", title="losses")
    ax_loss.legend()
    ax_d.plot(epochs, metrics["d_real"], label="D(real)")
    ax_d.plot(epochs, metrics["d_fake"], label="D(G(z))")
    ax_d.set(xlabel="epoch", ylabel="probability", title="discriminator", ylim=(0, 1))
    ax_d.legend()
    evaluated = metrics["evaluations"]
    at = [e["epoch"] for e in evaluated]
    for key in ("label_accuracy", "diversity_ratio", "memorisation_ratio"):
        ax_q.plot(at, [e[key] for e in evaluated], marker="o", label=key)
    ax_q.plot(at, [e["fid_ratio"] / 10 for e in evaluated], marker="o", label="fid_ratio / 10")
    ax_q.axvline(metrics["selected_epoch"], color="grey", linestyle="--", label="shipped")
    ax_q.set(xlabel="epoch", title="quality (LeNet-5 judge)")
    ax_q.legend(fontsize="small")
    fig.savefig(path, dpi=100)


def load_classifier(path: Path) -> LeNet5:
    """A LeNet-5 from a train_classifier checkpoint, in eval mode."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    assert checkpoint.get("model") == "lenet5", f"{path}: expected a lenet5 checkpoint"
    model = LeNet5(LeNetConfig(**checkpoint["config"]))
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval()


def run(
    seed: int = 0,
    epochs: int | None = None,
    time_budget: float | None = None,
    run_dir: Path = Path("runs/dcgan"),
    repository: Path | None = Path("models"),
    quick: bool = False,
    progress: bool = True,
    hp: Hyperparameters | None = None,
    threads: int | None = 1,
    eval_every: int | None = None,
    classifier_checkpoint: Path | None = None,
) -> dict:
    """Train, evaluate, write checkpoint/metrics/plots/grids into run_dir, publish unless repository is None.

    Training stops after `epochs`, or earlier at the end of the first epoch past `time_budget`
    seconds. The judge is the LeNet-5 at `classifier_checkpoint`, or one trained here with the
    classifier's defaults (about 25 s; its quick variant with `quick`). `quick` also shrinks the
    networks, so that a test run takes seconds. `threads` as in train_classifier.run: one by
    default, for reproducibility and because a shared machine cannot then stall the run.

    Returns the metrics (as written to metrics.json), with an "export" entry when published.
    """
    hp = hp or Hyperparameters()
    if threads is not None:
        torch.set_num_threads(threads)
    if epochs is None:
        epochs = QUICK_EPOCHS if quick else DEFAULT_EPOCHS
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    eval_every = eval_every or (1 if quick else DEFAULT_EVAL_EVERY)
    run_dir = Path(run_dir)
    (run_dir / SAMPLES_DIR).mkdir(parents=True, exist_ok=True)
    splits = load_digit_splits()

    started = time.perf_counter()
    if classifier_checkpoint is None:
        classifier_dir = run_dir / "classifier"
        train_classifier.run(
            seed=seed, run_dir=classifier_dir, repository=None, quick=quick, progress=False, threads=threads
        )
        classifier_checkpoint = classifier_dir / CHECKPOINT_FILE
    classifier = load_classifier(Path(classifier_checkpoint))
    classifier_seconds = time.perf_counter() - started

    rng = seed_everything(seed)
    config = DCGANConfig(g_width=16, d_width=16) if quick else DCGANConfig()
    generator, discriminator = Generator(config), Discriminator(config)
    betas = (hp.beta1, hp.beta2)
    g_optimizer = torch.optim.Adam(generator.parameters(), lr=hp.lr, betas=betas)
    d_optimizer = torch.optim.Adam(discriminator.parameters(), lr=hp.lr, betas=betas)
    images, labels = torch.tensor(splits.train.images), torch.tensor(splits.train.labels)
    grid_z, grid_labels = fixed_grid_inputs(config, seed)

    history: dict[str, list[float]] = {"d_loss": [], "g_loss": [], "d_real": [], "d_fake": []}
    evaluations: list[dict[str, float]] = []
    best: dict[str, float] | None = None
    best_state = None
    started = time.perf_counter()
    bar = tqdm(range(1, epochs + 1), desc=MODEL_NAME, unit="epoch", disable=not progress)
    for epoch in bar:
        stats = train(generator, discriminator, g_optimizer, d_optimizer, images, labels, hp, rng)
        for key, value in stats.items():
            history[key].append(value)
        save_grid(generate(generator, grid_z, grid_labels), config.num_classes, _grid_path(run_dir, epoch))
        out_of_time = time_budget is not None and time.perf_counter() - started >= time_budget
        if epoch % eval_every == 0 or epoch == epochs or out_of_time:
            quality = {"epoch": epoch, **evaluate(generator, classifier, splits, EVAL_PER_CLASS, seed + 2)}
            evaluations.append(quality)
            if best is None or selection_key(quality) > selection_key(best):
                best, best_state = quality, copy.deepcopy(generator.state_dict())
        bar.set_postfix(
            d=f"{stats['d_loss']:.2f}",
            g=f"{stats['g_loss']:.2f}",
            acc=f"{evaluations[-1]['label_accuracy']:.3f}" if evaluations else "-",
            best=f"{best['label_accuracy']:.3f}@{best['epoch']}" if best else "-",
        )
        if out_of_time:
            break
    seconds = time.perf_counter() - started
    assert best is not None and best_state is not None, "the last epoch is always evaluated"

    selected_epoch = int(best["epoch"])
    generator.load_state_dict(best_state)
    final = evaluate(
        generator, classifier, splits, FINAL_PER_CLASS, seed + 3
    )  # fresh latents: no selection bias
    selection = (
        f"shipped epoch {selected_epoch} of {len(history['d_loss'])}: {SELECTION_RULE}; "
        f"{len(evaluations)} checkpoints evaluated, every {eval_every} epochs"
    )
    metrics = {
        "model": MODEL_NAME,
        "seed": seed,
        "epochs": len(history["d_loss"]),
        "epochs_planned": epochs,
        "time_budget_s": time_budget,
        "quick": quick,
        "threads": torch.get_num_threads(),
        "config": asdict(config),
        "hyperparameters": asdict(hp),
        **history,
        "evaluations": evaluations,
        "selection_rule": SELECTION_RULE,
        "selection": selection,
        "selected_epoch": selected_epoch,
        "selected_quality": best,
        "final_per_class": FINAL_PER_CLASS,
        **final,
        "classifier_checkpoint": str(classifier_checkpoint),
        "classifier_seconds": round(classifier_seconds, 2),
        "seconds": round(seconds, 2),
    }
    print(
        f"{MODEL_NAME}: {selection}\n"
        f"{MODEL_NAME}: label accuracy {final['label_accuracy']:.4f}, "
        f"confidence {final['mean_confidence']:.4f}, "
        f"diversity {final['diversity_ratio']:.3f}, FID {final['fid']:.3f} (floor {final['fid_floor']:.3f}), "
        f"memorisation {final['memorisation_ratio']:.3f}; {seconds:.1f} s"
    )

    grid = run_dir / BEST_GRID_FILE
    save_grid(generate(generator, grid_z, grid_labels), config.num_classes, grid)
    metrics["grid"] = str(grid)
    checkpoint = {
        "model": MODEL_NAME,
        "config": asdict(config),
        "state_dict": generator.state_dict(),
        "seed": seed,
        "hyperparameters": asdict(hp),
        "metrics": {**final, "selected_epoch": selected_epoch, "epochs": len(history["d_loss"])},
        "selection": selection,
    }
    return finish_run(run_dir, checkpoint, metrics, plot_losses, LOSSES_FILE, repository)


def _grid_path(run_dir: Path, epoch: int) -> Path:
    return run_dir / SAMPLES_DIR / f"epoch_{epoch:04d}.png"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The trainer's flags; shared with `convserve-train gan`."""
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help=f"epochs to train at most (default: {DEFAULT_EPOCHS}, or {QUICK_EPOCHS} with --quick)",
    )
    parser.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="stop after the first epoch that ends past this many seconds of training (default: none)",
    )
    parser.add_argument(
        "--eval-every",
        type=int,
        default=None,
        help=f"evaluate a checkpoint every N epochs (default: {DEFAULT_EVAL_EVERY}, or 1 with --quick)",
    )
    parser.add_argument(
        "--classifier-checkpoint",
        type=Path,
        default=None,
        help="LeNet-5 checkpoint that judges the digits (default: train one in the run, about 25 s)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="small networks, a few epochs, for tests (default: off)"
    )
    add_output_arguments(parser, MODEL_NAME, "checkpoint, metrics, losses plot and sample grids")


def run_from_args(args: argparse.Namespace) -> int:
    run(
        seed=args.seed,
        epochs=args.epochs,
        time_budget=args.time_budget,
        run_dir=args.run_dir,
        repository=None if args.no_export else args.repository,
        quick=args.quick,
        progress=not args.no_progress,
        threads=args.threads or None,
        eval_every=args.eval_every,
        classifier_checkpoint=args.classifier_checkpoint,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Train a label-conditional DCGAN on scikit-learn's digits and publish it as ONNX."
    )
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
