"""LeNet-5 (LeCun et al., 1998) with ReLU and max pooling, taking uint8 images.

Casting, scaling and normalisation happen inside forward(), so they are part of the exported
ONNX graph and the server never has to know the training statistics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class LeNetConfig:
    in_channels: int = 1
    image_size: int = 32
    num_classes: int = 10
    mean: float = 0.5  # of the training pixels, after scaling to [0, 1]
    std: float = 0.5

    def __post_init__(self) -> None:
        assert self.image_size == 32, f"LeNet-5 is laid out for 32x32 inputs, got {self.image_size}"
        assert self.std > 0, f"std must be positive, got {self.std}"


class LeNet5(nn.Module):
    """conv5(6) -> pool -> conv5(16) -> pool -> fc120 -> fc84 -> fc(num_classes)."""

    def __init__(self, config: LeNetConfig) -> None:
        super().__init__()
        self.config = config
        self.conv1 = nn.Conv2d(config.in_channels, 6, kernel_size=5)
        self.conv2 = nn.Conv2d(6, 16, kernel_size=5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, config.num_classes)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 pixels (or floats in 0..255) -> standardised floats."""
        c = self.config
        assert x.ndim == 4 and x.shape[1:] == (c.in_channels, c.image_size, c.image_size), (
            f"expected (N, {c.in_channels}, {c.image_size}, {c.image_size}), got {tuple(x.shape)}"
        )
        x = x.float() / 255.0
        return (x - c.mean) / c.std

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The fc84 activations: a compact embedding, e.g. for Frechet distances."""
        x = self.normalise(x)  # (N, C, 32, 32)
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # (N, 6, 14, 14)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (N, 16, 5, 5)
        x = torch.flatten(x, 1)  # (N, 400)
        x = F.relu(self.fc1(x))  # (N, 120)
        return F.relu(self.fc2(x))  # (N, 84)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, 32, 32) uint8 -> (N, num_classes) logits."""
        return self.fc3(self.features(x))
