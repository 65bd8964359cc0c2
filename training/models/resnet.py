"""A small residual network (He et al., 2016, basic blocks) for RGB images, taking uint8 input.

As in LeNet-5, casting, scaling and per-channel normalisation are part of forward(), so the
exported graph takes the image as the server decodes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ResNetConfig:
    in_channels: int = 3
    image_size: int = 64
    num_classes: int = 12
    widths: tuple[int, ...] = (16, 32, 64)  # one stage each; every stage after the first halves H and W
    blocks_per_stage: int = 1
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])  # per channel, pixels in [0, 1]
    std: list[float] = field(default_factory=lambda: [0.25, 0.25, 0.25])
    instance_norm: bool = False  # IBN: half the channels of the stem and first block normalised per image

    def __post_init__(self) -> None:
        self.widths = tuple(self.widths)  # a checkpoint stores a list
        assert len(self.mean) == len(self.std) == self.in_channels, "one mean and std per channel"
        assert all(s > 0 for s in self.std), f"std must be positive, got {self.std}"
        assert self.image_size % 2 ** len(self.widths) == 0, "the image size must halve at every stage"


class InstanceBatchNorm(nn.Module):
    """Half the channels normalised per image (instance norm), half over the batch (IBN-Net, Pan et
    al., 2018): per-image statistics take out how a picture is drawn (background, shades, contrast),
    which batch statistics learned on the training styles cannot, while the batch-normalised half
    keeps what per-image normalisation would erase (whether a feature is there at all)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.half = channels // 2
        self.instance = nn.InstanceNorm2d(self.half, affine=True)
        self.batch = nn.BatchNorm2d(channels - self.half)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.split([self.half, x.shape[1] - self.half], dim=1)
        return torch.cat([self.instance(a.contiguous()), self.batch(b.contiguous())], dim=1)


def norm_layer(channels: int, instance: bool) -> nn.Module:
    return InstanceBatchNorm(channels) if instance else nn.BatchNorm2d(channels)


class BasicBlock(nn.Module):
    """conv3-BN-ReLU-conv3-BN plus a shortcut (1x1 conv when the shape changes), then ReLU;
    `instance`: the first norm is half instance norm (see InstanceBatchNorm)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, instance: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm_layer(out_channels, instance)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """stem conv3/2 -> stages of basic blocks (stride 2 between stages) -> global average pool -> fc."""

    def __init__(self, config: ResNetConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.stem = nn.Sequential(
            nn.Conv2d(c.in_channels, c.widths[0], 3, stride=2, padding=1, bias=False),
            norm_layer(c.widths[0], c.instance_norm),
            nn.ReLU(inplace=True),
        )
        blocks: list[nn.Module] = []
        previous = c.widths[0]
        for stage, width in enumerate(c.widths):
            for i in range(c.blocks_per_stage):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(BasicBlock(previous, width, stride, c.instance_norm and not blocks))
                previous = width
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(previous, c.num_classes)
        self.register_buffer("mean", torch.tensor(c.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(c.std).view(1, -1, 1, 1), persistent=False)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 pixels (N, C, H, W) -> standardised floats."""
        c = self.config
        assert x.ndim == 4 and x.shape[1:] == (c.in_channels, c.image_size, c.image_size), (
            f"expected (N, {c.in_channels}, {c.image_size}, {c.image_size}), got {tuple(x.shape)}"
        )
        return (x.float() / 255.0 - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, 64, 64) uint8 -> (N, num_classes) logits."""
        x = self.stem(self.normalise(x))  # (N, w0, 32, 32)
        x = self.blocks(x)  # (N, w_last, 8, 8)
        return self.fc(x.mean(dim=(2, 3)))  # (N, num_classes)
