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
