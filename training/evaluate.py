"""Evaluation metrics shared by the trainers and the exporter."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


@torch.no_grad()
def predict_logits(
    model: nn.Module, images: np.ndarray | torch.Tensor, batch_size: int = 512
) -> torch.Tensor:
    """Logits for a whole array of uint8 images, in eval mode and in batches to bound memory."""
    was_training = model.training
    model.eval()
    images = torch.tensor(images) if isinstance(images, np.ndarray) else images  # copy: may be read-only
    outputs = [model(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    model.train(was_training)
    return torch.cat(outputs)


def classification_accuracy(logits: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> float:
    """Fraction of rows whose arg-max equals the label."""
    logits, labels = np.asarray(logits), np.asarray(labels)
    assert len(logits) == len(labels), f"{len(logits)} predictions for {len(labels)} labels"
    assert len(labels) > 0, "accuracy of an empty set is undefined"
    return float((logits.argmax(axis=1) == labels).mean())


# --- generators: judged by a separately trained classifier, never by their own discriminator ---


def _unit_pixels(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 images (N, ...) -> float64 rows (N, pixels) in [0, 1], for distances."""
    images = torch.tensor(np.asarray(images))  # a copy: cached splits are read-only
    return images.reshape(len(images), -1).double() / 255.0


@torch.no_grad()
def predict_features(
    model: nn.Module, images: np.ndarray | torch.Tensor, batch_size: int = 512
) -> np.ndarray:
    """`model.features` (e.g. LeNet-5's fc84 activations) for uint8 images, in eval mode and batches."""
    was_training = model.training
    model.eval()
    images = torch.tensor(images) if isinstance(images, np.ndarray) else images
    outputs = [model.features(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    model.train(was_training)
    return torch.cat(outputs).double().numpy()


def label_accuracy_and_confidence(
    logits: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray
) -> tuple[float, float]:
    """Fraction classified as the requested label, and the mean softmax probability of that label.

    The probability of the requested label (not of the arg-max) is the confidence: a digit
    that is confidently the wrong class must not count as confident.
    """
    logits = torch.as_tensor(np.asarray(logits)).double()
    labels = torch.as_tensor(np.asarray(labels)).long()
    probability = torch.softmax(logits, dim=1).gather(1, labels[:, None]).squeeze(1)
    return classification_accuracy(logits, labels), float(probability.mean())


def mean_within_class_distance(images: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor) -> float:
    """Mean L2 distance between two different images of the same class (pixels in [0, 1]).

    The mean over classes of the mean over pairs; 0 when every class is one repeated image.
    """
    x, labels = _unit_pixels(images), np.asarray(labels)
    means = []
    for label in np.unique(labels):
        rows = x[torch.as_tensor(labels == label)]
        n = len(rows)
        assert n >= 2, f"class {label} needs at least two images for a pairwise distance"
        distances = torch.cdist(rows, rows)  # (n, n), zero diagonal
        means.append(float(distances.sum()) / (n * (n - 1)))
    return float(np.mean(means))


def diversity_ratio(
    generated: np.ndarray,
    generated_labels: np.ndarray,
    real: np.ndarray,
    real_labels: np.ndarray,
) -> float:
    """Within-class spread of generated digits over that of real ones: ~1 is real variety, 0 collapse."""
    return mean_within_class_distance(generated, generated_labels) / mean_within_class_distance(
        real, real_labels
    )


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two sets of feature rows (the FID formula).

    ||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2)); the last trace is taken as the
    sum of square roots of the eigenvalues of the symmetric S_a^(1/2) S_b S_a^(1/2), which has the
    same spectrum and, unlike a general matrix square root, no complex round-off to discard.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.ndim == b.ndim == 2 and a.shape[1] == b.shape[1], f"feature rows differ: {a.shape}, {b.shape}"
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    values, vectors = np.linalg.eigh(cov_a)
    root_a = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T  # S_a^(1/2)
    middle = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    trace_root = float(np.sum(np.sqrt(np.clip(middle, 0, None))))
    distance = float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_root)
    return max(distance, 0.0)


def mean_nearest_distance(queries: np.ndarray, references: np.ndarray, batch_size: int = 1024) -> float:
    """Mean over queries of the L2 distance to the nearest reference image (pixels in [0, 1])."""
    q, r = _unit_pixels(queries), _unit_pixels(references)
    nearest = [torch.cdist(q[i : i + batch_size], r).min(1).values for i in range(0, len(q), batch_size)]
    return float(torch.cat(nearest).mean())


def memorisation_ratio(generated: np.ndarray, train: np.ndarray, heldout: np.ndarray) -> float:
    """Nearest-training-image distance of generated digits over that of held-out real digits.

    ~1: generated digits are as far from the training set as unseen real digits are; ~0: copies.
    """
    return mean_nearest_distance(generated, train) / mean_nearest_distance(heldout, train)


def generator_quality(
    classifier: nn.Module,
    generated: np.ndarray,
    generated_labels: np.ndarray,
    train: np.ndarray,
    train_labels: np.ndarray,
    heldout: np.ndarray,
) -> dict[str, float]:
    """Every generator metric at once; `classifier` needs `features` (LeNet-5), and must not be D.

    FID compares generated digits with held-out real ones; `fid_floor` is the same distance
    between the real training and held-out digits, what a perfect generator would score.
    """
    accuracy, confidence = label_accuracy_and_confidence(
        predict_logits(classifier, generated), generated_labels
    )
    heldout_features = predict_features(classifier, heldout)
    fid = frechet_distance(predict_features(classifier, generated), heldout_features)
    floor = frechet_distance(predict_features(classifier, train), heldout_features)
    return {
        "label_accuracy": accuracy,
        "mean_confidence": confidence,
        "diversity_ratio": diversity_ratio(generated, generated_labels, train, train_labels),
        "fid": fid,
        "fid_floor": floor,
        "fid_ratio": fid / floor,
        "memorisation_ratio": memorisation_ratio(generated, train, heldout),
    }
