"""Train the show-attend-tell captioner on generated scenes, evaluate it, then export and publish it.

Training targets are the reference captions that name the objects in reading order (left to
right, top to bottom), in all their phrasings: with a free order the first word already has to
guess which object the caption will start from, and a first try that trained on every order
said "left" or "right" at chance. Evaluation scores against every reference.

The checkpoint kept is the one with the best semantic accuracy of greedy captions on the
validation split; the test splits are only used once, for the final table. A caption is at most as
long as the grammar's longest sentence and says no word more often than the grammar ever does.
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
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from tqdm import tqdm

from training.arguments import add_training_arguments, run_arguments
from training.augment import random_blur
from training.caption_decoding import CaptionModel, beam_search, greedy_decode, words
from training.caption_metrics import bleu, cider_d, tokenize
from training.data.scenes import (
    COLOURS,
    SHAPES,
    SIZES,
    TEST_SPLITS,
    SceneSplit,
    grammar_limits,
    load_scene_split,
    parse_caption,
)
from training.models.captioner import END, PAD, SPECIAL_TOKENS, START, UNKNOWN, Captioner, CaptionerConfig
from training.runs import CURVES_FILE, finish_run, start_run

MODEL_NAME = "captioner"
DEFAULT_EPOCHS = 6
QUICK_EPOCHS = 2
QUICK_SIZES = {"train": 600, "validation": 100, "test": 100, "compositional": 100, "style-shift": 100}
DATA_SEED = 0  # the scenes do not change with the training seed, so results compare across seeds
VALIDATION_IMAGES = 500  # greedy-decoded after every epoch to choose the checkpoint
BEAM_SIZES = (1, 3)  # 1 is greedy


@dataclass(frozen=True)
class Hyperparameters:
    batch_size: int = 64
    lr: float = 2e-3
    attention_penalty: float = 0.02  # lambda of the doubly stochastic attention regulariser
    clip_norm: float = 5.0
    objects_weight: float = 1.0  # of the auxiliary per-cell object loss (see models/captioner.py)
    # Training scenes, drawn once: four times the standard split (SPLIT_SIZES), in half the epochs.
    # More ways of drawing the scenes did more for the held-out styles than more epochs did
    # (docs/models.md).
    train_scenes: int = 32000
    # Soft focus on a share of each batch (training/augment.py); sigma in px at 64x64.
    blur_probability: float = 0.4
    blur_sigma: tuple[float, float] = (0.3, 0.9)


def caption_split(name: str, quick: bool, train_scenes: int, progress: bool) -> SceneSplit:
    """A split of the captioning scenes, shared by both captioners: the small --quick sizes, else
    `train_scenes` training scenes (drawn with a progress bar) and the standard evaluation splits."""
    if quick:
        return load_scene_split(name, DATA_SEED, QUICK_SIZES[name])
    if name == "train":
        return load_scene_split(name, DATA_SEED, train_scenes, progress)
    return load_scene_split(name, DATA_SEED)


def build_vocabulary(captions: tuple[tuple[str, ...], ...]) -> list[str]:
    """Special tokens, then every word of the training captions, sorted (stable across runs)."""
    found = sorted({word for refs in captions for caption in refs for word in tokenize(caption)})
    return [*SPECIAL_TOKENS, *found]


def encode(caption: str, index: dict[str, int], length: int) -> list[int]:
    """<start> words <end>, padded to `length` + 2."""
    ids = [index.get(word, UNKNOWN) for word in tokenize(caption)][:length]
    return [START, *ids, END] + [PAD] * (length - len(ids))


def sample_targets(
    split: SceneSplit, index: dict[str, int], length: int, rng: np.random.Generator
) -> torch.Tensor:
    """One reading-order reference per image, chosen afresh every epoch: (N, length + 2) token ids."""
    return torch.tensor([encode(refs[rng.integers(len(refs))], index, length) for refs in split.canonical])


def caption_loss(
    logits: torch.Tensor, alphas: torch.Tensor, tokens: torch.Tensor, penalty: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy on the words (pads ignored) + lambda * sum_l (1 - sum_t alpha_tl)^2 over real steps."""
    targets = tokens[:, 1:]  # (N, T-1)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=PAD)
    steps = (targets != PAD).unsqueeze(2).float()  # (N, T-1, 1)
    coverage = (alphas * steps).sum(dim=1)  # (N, L)
    return ce, penalty * ((1.0 - coverage) ** 2).sum(dim=1).mean()


@dataclass(frozen=True)
class ObjectTargets:
    """What the auxiliary head should say about each grid cell (row-major, as the features)."""

    centre: torch.Tensor  # (N, L) 1.0 where an object's centre falls, else 0.0
    attributes: torch.Tensor  # (N, L, 3) colour, shape, size index at those cells, -1 elsewhere


def object_targets(split: SceneSplit, config: CaptionerConfig) -> ObjectTargets:
    """The auxiliary head's targets, from the objects and boxes the generator drew."""
    n, grid = len(split.images), config.grid_size
    cell = config.image_size / grid
    centre = torch.zeros(n, grid * grid)
    attributes = torch.full((n, grid * grid, 3), -1, dtype=torch.long)
    for i, (layout, boxes) in enumerate(zip(split.layouts, split.boxes, strict=True)):
        for obj, (x0, y0, x1, y1) in zip(layout.objects, boxes, strict=True):
            column = min(int((x0 + x1) / 2 / cell), grid - 1)
            row = min(int((y0 + y1) / 2 / cell), grid - 1)
            centre[i, row * grid + column] = 1.0
            attributes[i, row * grid + column] = torch.tensor(
                [list(COLOURS).index(obj.colour), SHAPES.index(obj.shape), list(SIZES).index(obj.size)]
            )
    return ObjectTargets(centre, attributes)


def object_loss(logits: torch.Tensor, targets: ObjectTargets) -> torch.Tensor:
    """(N, L, 10) head outputs: binary cross-entropy on object centres, cross-entropy on attributes."""
    loss = F.binary_cross_entropy_with_logits(logits[..., 0], targets.centre)
    start = 1
    for k, width in enumerate((len(COLOURS), len(SHAPES), len(SIZES))):
        part = logits[..., start : start + width]
        loss = loss + F.cross_entropy(
            part.reshape(-1, width), targets.attributes[..., k].reshape(-1), ignore_index=-1
        )
        start += width
    return loss


def train_epoch(
    model: Captioner,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    images: torch.Tensor,
    targets: torch.Tensor,
    hp: Hyperparameters,
    generator: torch.Generator,
    bar: tqdm | None = None,
    objects: ObjectTargets | None = None,
) -> float:
    """One epoch of teacher forcing over shuffled batches, with the auxiliary object loss when
    `objects` are given; returns the mean cross-entropy of the words."""
    model.train()
    order = torch.randperm(len(images), generator=generator)
    total = 0.0
    for start in range(0, len(order), hp.batch_size):
        idx = order[start : start + hp.batch_size]
        tokens = targets[idx]
        length = int((tokens != PAD).sum(dim=1).max())  # trim the batch to its longest caption
        tokens = tokens[:, :length]
        features = model.encoder(random_blur(images[idx], generator, hp.blur_probability, hp.blur_sigma))
        logits, alphas = model.tell(features, tokens)
        ce, penalty = caption_loss(logits, alphas, tokens, hp.attention_penalty)
        loss = ce + penalty
        if objects is not None and model.objects is not None:
            batch = ObjectTargets(objects.centre[idx], objects.attributes[idx])
            loss = loss + hp.objects_weight * object_loss(model.objects(features), batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), hp.clip_norm)
        optimizer.step()
        scheduler.step()
        total += ce.item() * len(idx)
        if bar is not None:
            bar.update(len(idx))
    return total / len(images)


def semantic_accuracy(captions: list[str], split: SceneSplit) -> float:
    """Fraction of captions that parse into exactly the scene's objects, attributes and order."""
    return float(
        np.mean([parse_caption(c) == layout for c, layout in zip(captions, split.layouts, strict=True)])
    )


def score(captions: list[str], split: SceneSplit) -> dict[str, float]:
    """BLEU-1..4 and CIDEr-D against every reference, semantic accuracy, the share that parses and
    the longest caption's words."""
    candidates = [tokenize(c) for c in captions]
    references = [[tokenize(r) for r in refs] for refs in split.captions]
    b = bleu(candidates, references)
    return {
        **{f"bleu{n}": round(100 * v, 2) for n, v in enumerate(b, start=1)},
        "cider_d": round(cider_d(candidates, references), 3),
        "semantic_accuracy": round(float(semantic_accuracy(captions, split)), 4),
        "parsed": round(float(np.mean([parse_caption(c) is not None for c in captions])), 4),
        "longest": max(len(c) for c in candidates),
    }


def decode(model: CaptionModel, images: np.ndarray, beam_size: int) -> list[str]:
    """Captions of a whole split: greedy for beam 1, else the best of a beam search per image."""
    vocabulary = model.config.vocabulary
    batch = torch.tensor(images)
    if beam_size == 1:
        return [words(t, vocabulary) for t in greedy_decode(model, batch)]
    return [words(beam_search(model, image, beam_size)[0].tokens, vocabulary) for image in batch]


def evaluation_table(model: CaptionModel, splits: dict[str, SceneSplit], progress: bool) -> dict[str, dict]:
    """{split: {"greedy" | "beam3": scores}} on the test splits."""
    table: dict[str, dict] = {}
    jobs = [(name, beam) for name in splits for beam in BEAM_SIZES]
    for name, beam in tqdm(jobs, desc="evaluating", unit="decode", disable=not progress):
        table.setdefault(name, {})["greedy" if beam == 1 else f"beam{beam}"] = score(
            decode(model, splits[name].images, beam), splits[name]
        )
    return table


def plot_curves(metrics: dict, path: Path) -> None:
    """Training cross-entropy and validation semantic accuracy per epoch."""
    fig = Figure(figsize=(10, 4), layout="tight")
    draw_caption_curves(*fig.subplots(1, 2), metrics, "loss")
    fig.savefig(path, dpi=100)


def draw_caption_curves(ax_loss: Axes, ax_acc: Axes, metrics: dict, title: str) -> None:
    """The decoder's teacher-forced cross-entropy and greedy validation semantic accuracy per epoch."""
    epochs = range(1, len(metrics["train_loss"]) + 1)
    ax_loss.plot(epochs, metrics["train_loss"], label="train (teacher forcing)")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy per word", title=title, yscale="log")
    ax_loss.legend()
    ax_acc.plot(epochs, metrics["val_semantic_accuracy"], label="validation, greedy")
    ax_acc.set(xlabel="epoch", ylabel="semantic accuracy", title="captions exactly right", ylim=(0, 1))
    ax_acc.legend()


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
    """Train, evaluate, write checkpoint/metrics/curves into run_dir, publish into repository unless None."""
    hp = hp or Hyperparameters()
    run_dir, epochs, generator = start_run(
        run_dir, seed, epochs, quick, DEFAULT_EPOCHS, QUICK_EPOCHS, threads
    )
    rng = np.random.default_rng(seed)

    def split(name: str) -> SceneSplit:
        return caption_split(name, quick, hp.train_scenes, progress)

    started = time.perf_counter()
    train = split("train")
    validation = split("validation")
    validation = validation.head(min(VALIDATION_IMAGES, len(validation.images)))
    pixels = torch.tensor(train.images).float() / 255.0
    longest, repeats = grammar_limits()
    config = CaptionerConfig(
        vocabulary=build_vocabulary(train.captions),
        max_length=longest,
        max_repeats=repeats,
        objects_head=hp.objects_weight > 0,
        instance_norm=True,
        mean=pixels.mean(dim=(0, 2, 3)).tolist(),
        std=pixels.std(dim=(0, 2, 3)).tolist(),
    )
    del pixels
    index = {word: i for i, word in enumerate(config.vocabulary)}
    model = Captioner(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=hp.lr)
    steps = epochs * math.ceil(len(train.images) / hp.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=hp.lr, total_steps=steps, pct_start=0.15
    )
    images = torch.tensor(train.images)
    objects = object_targets(train, config) if config.objects_head else None

    history: dict[str, list[float]] = {"train_loss": [], "val_semantic_accuracy": []}
    best_val, best_epoch, best_state = -1.0, 0, None
    bar = tqdm(total=epochs * len(images), desc=MODEL_NAME, unit="img", disable=not progress)
    for epoch in range(1, epochs + 1):
        targets = sample_targets(train, index, config.max_length, rng)
        loss = train_epoch(model, optimizer, scheduler, images, targets, hp, generator, bar, objects)
        val = semantic_accuracy(decode(model, validation.images, 1), validation)
        history["train_loss"].append(loss)
        history["val_semantic_accuracy"].append(val)
        if val >= best_val:
            best_val, best_epoch, best_state = val, epoch, copy.deepcopy(model.state_dict())
        bar.set_postfix(
            epoch=epoch, loss=f"{loss:.3f}", val=f"{val:.3f}", best=f"{best_val:.3f}@{best_epoch}"
        )
        if not progress:
            print(
                f"{MODEL_NAME}: epoch {epoch}/{epochs} loss {loss:.4f} val semantic accuracy {val:.4f}",
                flush=True,
            )
    bar.close()
    train_seconds = time.perf_counter() - started

    model.load_state_dict(best_state)
    table = evaluation_table(model, {name: split(name) for name in TEST_SPLITS}, progress)
    metrics = {
        "model": MODEL_NAME,
        "seed": seed,
        "epochs": epochs,
        "quick": quick,
        "threads": torch.get_num_threads(),
        "train_images": len(images),
        "vocabulary_size": len(config.vocabulary),
        "hyperparameters": asdict(hp),
        **history,
        "selected_epoch": best_epoch,
        "val_semantic_accuracy_selected": best_val,
        "evaluation": table,
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
        "selection": f"epoch {best_epoch} of {epochs}, best greedy semantic accuracy on validation",
    }
    return finish_run(run_dir, checkpoint, metrics, plot_curves, CURVES_FILE, repository)


def print_summary(model: str, table: dict[str, dict], note: str) -> None:
    """One line: greedy semantic accuracy on every test split, and the test split's BLEU-4 and CIDEr-D."""
    test = table["test"]["greedy"]
    others = ", ".join(
        f"{name} {table[name]['greedy']['semantic_accuracy']:.4f}" for name in table if name != "test"
    )
    print(
        f"{model}: test semantic accuracy {test['semantic_accuracy']:.4f}, BLEU-4 {test['bleu4']}, "
        f"CIDEr-D {test['cider_d']}; {others} ({note})"
    )


def flat_metrics(table: dict[str, dict]) -> dict[str, float]:
    """{"test_greedy_bleu4": ..., ...}: the evaluation table as the manifest's flat metrics."""
    return {
        f"{split}_{decoding}_{name}": float(value)
        for split, rows in table.items()
        for decoding, scores in rows.items()
        for name, value in scores.items()
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The trainer's flags; shared with `convserve-train captioner`."""
    add_training_arguments(
        parser, MODEL_NAME, DEFAULT_EPOCHS, QUICK_EPOCHS, "few epochs on small splits, for tests"
    )


def run_from_args(args: argparse.Namespace) -> int:
    run(**run_arguments(args))
    return 0
