"""Train captioner-butd: first the region detector on the scenes' boxes, then the top-down decoder.

Stage one (bottom up) trains the detector alone, on what the scene generator knows about every
object: where its box is and its colour, shape and size. Stage two freezes it, computes every
training image's region features once, and trains the two-LSTM decoder on them with teacher
forcing, so an epoch of the decoder costs no convolution at all. The checkpoint kept is, as for
the captioner, the decoder epoch with the best greedy semantic accuracy on validation scenes.
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
from training.augment import random_blur
from training.caption_decoding import greedy_decode, words
from training.data.scenes import TEST_SPLITS, SceneSplit, grammar_limits
from training.models.butd import ATTRIBUTES, STRIDE, BottomUpTopDown, BottomUpTopDownConfig, Detector
from training.models.captioner import PAD
from training.runs import CURVES_FILE, finish_run, start_run
from training.train_captioner import (
    build_vocabulary,
    caption_split,
    draw_caption_curves,
    evaluation_table,
    flat_metrics,
    print_summary,
    sample_targets,
    semantic_accuracy,
)

MODEL_NAME = "captioner-butd"
DEFAULT_EPOCHS = 6  # of the decoder
QUICK_EPOCHS = 2
VALIDATION_IMAGES = 500


@dataclass(frozen=True)
class Hyperparameters:
    # Training scenes, drawn once: twice the standard split (SPLIT_SIZES) in half the epochs of
    # both stages, about the same number of steps; with the soft focus below it did better on
    # every split than 8,000 scenes (docs/models.md).
    train_scenes: int = 16000
    detector_epochs: int = 4
    detector_lr: float = 3e-3
    batch_size: int = 64
    lr: float = 2e-3
    clip_norm: float = 5.0
    size_weight: float = 10.0  # box sizes are fractions of the image: small next to the other losses
    min_confidence: float = 0.5  # for the detector's own precision and recall in metrics.json
    # Soft focus on a share of each detector batch (training/augment.py); sigma in px at 64x64.
    blur_probability: float = 0.4
    blur_sigma: tuple[float, float] = (0.3, 0.9)


@dataclass
class DetectionTargets:
    """What the detector should say on each heat-map cell of each image."""

    heat: torch.Tensor  # (N, 1, S, S) a Gaussian bump at each object's centre, 1 at its cell
    centre: torch.Tensor  # (N, S, S) bool: the cell an object's centre falls in
    offset: torch.Tensor  # (N, 2, S, S) where in that cell, 0..1
    size: torch.Tensor  # (N, 2, S, S) the box's width and height in fractions of the image
    attributes: dict[str, torch.Tensor]  # name -> (N, S, S) value index near an object's centre, -1 elsewhere


def detection_targets(split: SceneSplit, config: BottomUpTopDownConfig) -> DetectionTargets:
    """The targets of every image from the boxes and objects the generator drew."""
    n, cells = len(split.images), config.map_size
    heat = np.zeros((n, cells, cells), np.float32)
    centre = np.zeros((n, cells, cells), bool)
    offset = np.zeros((n, 2, cells, cells), np.float32)
    size = np.zeros((n, 2, cells, cells), np.float32)
    attributes = {name: np.full((n, cells, cells), -1, np.int64) for name in ATTRIBUTES}
    ys, xs = np.mgrid[0:cells, 0:cells] + 0.5
    for i, (layout, boxes) in enumerate(zip(split.layouts, split.boxes, strict=True)):
        for obj, (x0, y0, x1, y1) in zip(layout.objects, boxes, strict=True):
            cx, cy = (x0 + x1) / 2 / STRIDE, (y0 + y1) / 2 / STRIDE  # in cells
            sigma = max(0.5, max(x1 - x0, y1 - y0) / STRIDE / 6)
            bump = np.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * sigma**2))
            column, row = min(int(cx), cells - 1), min(int(cy), cells - 1)
            bump[row, column] = 1.0
            heat[i] = np.maximum(heat[i], bump)
            centre[i, row, column] = True
            offset[i, :, row, column] = (cx - column, cy - row)
            size[i, :, row, column] = ((x1 - x0) / config.image_size, (y1 - y0) / config.image_size)
            near = bump >= 0.5
            values = {"colour": obj.colour, "shape": obj.shape, "size": obj.size}
            for name, options in ATTRIBUTES.items():
                attributes[name][i][near] = options.index(values[name])
    return DetectionTargets(
        torch.from_numpy(heat).unsqueeze(1),
        torch.from_numpy(centre),
        torch.from_numpy(offset),
        torch.from_numpy(size),
        {name: torch.from_numpy(a) for name, a in attributes.items()},
    )


def _subset(targets: DetectionTargets, index: torch.Tensor, flip: torch.Tensor) -> DetectionTargets:
    """The targets of a batch, mirrored left to right where `flip` says (as the images are)."""

    def mirror(t: torch.Tensor) -> torch.Tensor:
        view = flip.view(-1, *([1] * (t.ndim - 1)))
        return torch.where(view, t.flip(-1), t)

    centre = mirror(targets.centre[index])
    offset = mirror(targets.offset[index])
    offset[:, 0] = torch.where(flip.view(-1, 1, 1) & centre, 1.0 - offset[:, 0], offset[:, 0])
    return DetectionTargets(
        mirror(targets.heat[index]),
        centre,
        offset,
        mirror(targets.size[index]),
        {name: mirror(t[index]) for name, t in targets.attributes.items()},
    )


def detection_loss(
    detector: Detector,
    images: torch.Tensor,
    targets: DetectionTargets,
    hp: Hyperparameters,
    permutation: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """CenterNet's focal loss on the centres, L1 on offsets and sizes at them, cross-entropy on the
    attributes near them; each normalised by the number of objects."""
    out = detector(images, permutation)
    p = torch.sigmoid(out.centre).clamp(1e-4, 1 - 1e-4)
    positive = targets.heat == 1.0
    objects = positive.sum().clamp_min(1)
    focal_pos = -(torch.log(p) * (1 - p) ** 2)[positive].sum()
    focal_neg = -(torch.log(1 - p) * p**2 * (1 - targets.heat) ** 4)[~positive].sum()
    centre = (focal_pos + focal_neg) / objects
    mask = targets.centre.unsqueeze(1).float()  # (N, 1, S, S)
    offset = (torch.abs(out.offset - targets.offset) * mask).sum() / objects
    size = (torch.abs(out.size - targets.size) * mask).sum() / objects * hp.size_weight
    attributes = torch.stack(
        [
            F.cross_entropy(out.attributes[name], targets.attributes[name], ignore_index=-1)
            for name in ATTRIBUTES
        ]
    ).sum()
    total = centre + offset + size + attributes
    parts = {
        "centre": centre.item(),
        "offset": offset.item(),
        "size": size.item(),
        "attributes": attributes.item(),
    }
    return total, parts


def train_detector(
    model: BottomUpTopDown,
    images: torch.Tensor,
    targets: DetectionTargets,
    hp: Hyperparameters,
    epochs: int,
    generator: torch.Generator,
    progress: bool,
) -> list[float]:
    """Stage one: the detector on random left-right mirror images, its trunk on shuffled colour
    channels (see training/models/butd.py); returns the mean loss per epoch."""
    detector = model.encoder.detector
    optimizer = torch.optim.AdamW(detector.parameters(), lr=hp.detector_lr, weight_decay=1e-4)
    steps = epochs * math.ceil(len(images) / hp.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=hp.detector_lr, total_steps=steps)
    losses = []
    bar = tqdm(total=epochs * len(images), desc=f"{MODEL_NAME} detector", unit="img", disable=not progress)
    for epoch in range(1, epochs + 1):
        detector.train()
        order = torch.randperm(len(images), generator=generator)
        total = 0.0
        for start in range(0, len(order), hp.batch_size):
            index = order[start : start + hp.batch_size]
            flip = torch.rand(len(index), generator=generator) < 0.5
            batch = torch.where(flip.view(-1, 1, 1, 1), images[index].flip(3), images[index])
            batch = random_blur(batch, generator, hp.blur_probability, hp.blur_sigma)
            permutation = torch.stack([torch.randperm(3, generator=generator) for _ in index])
            loss, _ = detection_loss(detector, batch, _subset(targets, index, flip), hp, permutation)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item() * len(index)
            bar.update(len(index))
        losses.append(total / len(images))
        if not progress:
            print(f"{MODEL_NAME}: detector epoch {epoch}/{epochs} loss {losses[-1]:.4f}", flush=True)
    bar.close()
    detector.eval()
    return losses


@torch.no_grad()
def region_features(model: BottomUpTopDown, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """(N, R, F) region features of uint8 images, in eval mode."""
    model.eval()
    return torch.cat([model.encoder(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])


@torch.no_grad()
def detection_quality(model: BottomUpTopDown, split: SceneSplit, min_confidence: float) -> dict[str, float]:
    """Recall and precision of the regions the detector is sure of (a region matches an object when
    its centre falls inside the object's box), and how often a matched region names all three of
    the object's attributes right."""
    features, boxes = [], []
    images = torch.tensor(split.images)
    model.eval()
    for i in range(0, len(images), 256):
        f, b = model.encoder.detect(images[i : i + 256])
        features.append(f)
        boxes.append(b)
    features_all = torch.cat(features).numpy()
    size = model.config.image_size
    found = sure = right = objects = 0
    slices, start = {}, 0
    for name, options in ATTRIBUTES.items():
        slices[name] = slice(start, start + len(options))
        start += len(options)
    for regions, layout, truth in zip(features_all, split.layouts, split.boxes, strict=True):
        confident = regions[regions[:, -1] >= min_confidence]
        sure += len(confident)
        objects += len(layout.objects)
        centres = confident[:, start : start + 2] * size  # centre x, y in pixels
        for obj, (x0, y0, x1, y1) in zip(layout.objects, truth, strict=True):
            inside = (
                (centres[:, 0] >= x0) & (centres[:, 0] <= x1) & (centres[:, 1] >= y0) & (centres[:, 1] <= y1)
            )
            if not inside.any():
                continue
            found += 1
            region = confident[int(np.flatnonzero(inside)[0])]
            values = {"colour": obj.colour, "shape": obj.shape, "size": obj.size}
            said = {name: ATTRIBUTES[name][int(region[slices[name]].argmax())] for name in ATTRIBUTES}
            right += said == values
    return {
        "recall": round(found / max(objects, 1), 4),
        "precision": round(found / max(sure, 1), 4),
        "attributes_right": round(right / max(found, 1), 4),
    }


def train_decoder_epoch(
    model: BottomUpTopDown,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    features: torch.Tensor,
    targets: torch.Tensor,
    hp: Hyperparameters,
    generator: torch.Generator,
) -> float:
    """Stage two, one epoch: teacher forcing on precomputed region features; the mean cross-entropy."""
    decoder = model.decoder
    decoder.train()
    order = torch.randperm(len(features), generator=generator)
    total = 0.0
    for start in range(0, len(order), hp.batch_size):
        index = order[start : start + hp.batch_size]
        tokens = targets[index]
        tokens = tokens[:, : int((tokens != PAD).sum(dim=1).max())]
        logits, _ = decoder(features[index], tokens)
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1), ignore_index=PAD
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(decoder.parameters(), hp.clip_norm)
        optimizer.step()
        scheduler.step()
        total += loss.item() * len(index)
    return total / len(features)


def plot_curves(metrics: dict, path: Path) -> None:
    """The detector's loss, the decoder's cross-entropy and validation semantic accuracy per epoch."""
    fig = Figure(figsize=(15, 4), layout="tight")
    ax_det, ax_loss, ax_acc = fig.subplots(1, 3)
    ax_det.plot(range(1, len(metrics["detector_loss"]) + 1), metrics["detector_loss"])
    ax_det.set(xlabel="epoch", ylabel="loss", title="detector (stage one)", yscale="log")
    draw_caption_curves(ax_loss, ax_acc, metrics, "decoder (stage two)")
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
    """Train both stages, evaluate, write checkpoint/metrics/curves, publish into repository unless None."""
    hp = hp or Hyperparameters()
    run_dir, epochs, generator = start_run(
        run_dir, seed, epochs, quick, DEFAULT_EPOCHS, QUICK_EPOCHS, threads
    )
    rng = np.random.default_rng(seed)

    def split(name: str) -> SceneSplit:
        return caption_split(name, quick, hp.train_scenes, progress)

    started = time.perf_counter()
    train, validation = split("train"), split("validation")
    validation = validation.head(min(VALIDATION_IMAGES, len(validation.images)))
    images = torch.tensor(train.images)
    pixels = images.float() / 255.0
    longest, repeats = grammar_limits()
    config = BottomUpTopDownConfig(
        vocabulary=build_vocabulary(train.captions),
        max_length=longest,
        max_repeats=repeats,
        instance_norm=True,
        mean=pixels.mean(dim=(0, 2, 3)).tolist(),
        std=pixels.std(dim=(0, 2, 3)).tolist(),
    )
    del pixels
    model = BottomUpTopDown(config)

    detector_epochs = 1 if quick else hp.detector_epochs
    detector_loss = train_detector(
        model, images, detection_targets(train, config), hp, detector_epochs, generator, progress
    )
    detector_seconds = time.perf_counter() - started
    detection = detection_quality(model, validation, hp.min_confidence)
    print(f"{MODEL_NAME}: detector on validation {detection} ({detector_seconds:.0f} s)", flush=True)

    features = region_features(model, images)
    index = {word: i for i, word in enumerate(config.vocabulary)}
    optimizer = torch.optim.Adam(model.decoder.parameters(), lr=hp.lr)
    steps = epochs * math.ceil(len(images) / hp.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=hp.lr, total_steps=steps, pct_start=0.15
    )
    history: dict[str, list[float]] = {"train_loss": [], "val_semantic_accuracy": []}
    best_val, best_epoch, best_state = -1.0, 0, None
    bar = tqdm(range(1, epochs + 1), desc=f"{MODEL_NAME} decoder", unit="epoch", disable=not progress)
    for epoch in bar:
        targets = sample_targets(train, index, config.max_length, rng)
        loss = train_decoder_epoch(model, optimizer, scheduler, features, targets, hp, generator)
        captions = [
            words(t, config.vocabulary) for t in greedy_decode(model, torch.tensor(validation.images))
        ]
        val = semantic_accuracy(captions, validation)
        history["train_loss"].append(loss)
        history["val_semantic_accuracy"].append(val)
        if val >= best_val:
            best_val, best_epoch, best_state = val, epoch, copy.deepcopy(model.state_dict())
        bar.set_postfix(loss=f"{loss:.3f}", val=f"{val:.3f}", best=f"{best_val:.3f}@{best_epoch}")
        if not progress:
            print(f"{MODEL_NAME}: epoch {epoch}/{epochs} loss {loss:.4f} val semantic accuracy {val:.4f}")
    bar.close()
    train_seconds = time.perf_counter() - started

    model.load_state_dict(best_state)
    model.eval()
    tests = {name: split(name) for name in TEST_SPLITS}
    table = evaluation_table(model, tests, progress)
    detector_table = {name: detection_quality(model, tests[name], hp.min_confidence) for name in tests}
    metrics = {
        "model": MODEL_NAME,
        "seed": seed,
        "epochs": epochs,
        "detector_epochs": detector_epochs,
        "quick": quick,
        "threads": torch.get_num_threads(),
        "train_images": len(images),
        "vocabulary_size": len(config.vocabulary),
        "hyperparameters": asdict(hp),
        "detector_loss": detector_loss,
        "detector": detector_table,
        **history,
        "selected_epoch": best_epoch,
        "val_semantic_accuracy_selected": best_val,
        "evaluation": table,
        "detector_seconds": round(detector_seconds, 1),
        "train_seconds": round(train_seconds, 1),
        "seconds": round(time.perf_counter() - started, 1),
    }
    print_summary(MODEL_NAME, table, f"epoch {best_epoch}, {train_seconds:.0f} s training")
    checkpoint = {
        "model": MODEL_NAME,
        "config": asdict(config),
        "state_dict": model.state_dict(),
        "seed": seed,
        "hyperparameters": asdict(hp),
        "metrics": flat_metrics(table),
        "selection": f"decoder epoch {best_epoch} of {epochs}, best greedy semantic accuracy on validation",
    }
    return finish_run(run_dir, checkpoint, metrics, plot_curves, CURVES_FILE, repository)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The trainer's flags; shared with `convserve-train captioner-butd`."""
    add_training_arguments(
        parser,
        MODEL_NAME,
        DEFAULT_EPOCHS,
        QUICK_EPOCHS,
        "one detector epoch, few decoder epochs, small splits",
    )


def run_from_args(args: argparse.Namespace) -> int:
    run(**run_arguments(args))
    return 0
