"""A label-conditional DCGAN (Radford et al., 2016) for 32x32 grayscale digits.

Both networks follow the DCGAN recipe: strided (D) and transposed (G) convolutions instead of
pooling, batch norm, ReLU in G and LeakyReLU in D, tanh output, weights drawn from N(0, 0.02).
The generator joins a label embedding to the latent; the discriminator adds a projection term
(Miyato & Koyama, 2018), the inner product of a label embedding with its features, which
conditions it more strongly than feeding the label in as an input channel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class DCGANConfig:
    latent_size: int = 64
    num_classes: int = 10
    label_embedding: int = 16  # size of the label embedding joined to the latent in G
    channels: int = 1
    image_size: int = 32
    g_width: int = 64  # channels of G's last hidden layer; earlier layers have 2x and 4x
    d_width: int = 64  # channels of D's first layer; later layers have 2x and 4x
    leaky_slope: float = 0.2

    def __post_init__(self) -> None:
        assert self.image_size == 32, f"the DCGAN here is laid out for 32x32 images, got {self.image_size}"
        assert self.latent_size > 0 and self.num_classes > 1, "need a latent and at least two classes"


def init_weights(module: nn.Module) -> None:
    """DCGAN initialisation: conv and linear weights ~ N(0, 0.02); batch-norm scales ~ N(1, 0.02)."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class Generator(nn.Module):
    """(z, label) -> image in [-1, 1]: [z; embed(label)] -> 4x4 -> 8x8 -> 16x16 -> 32x32."""

    def __init__(self, config: DCGANConfig) -> None:
        super().__init__()
        self.config = config
        w = config.g_width
        self.embed = nn.Embedding(config.num_classes, config.label_embedding)
        self.net = nn.Sequential(
            nn.ConvTranspose2d(config.latent_size + config.label_embedding, 4 * w, 4, 1, 0, bias=False),
            nn.BatchNorm2d(4 * w),
            nn.ReLU(True),  # (N, 4w, 4, 4)
            nn.ConvTranspose2d(4 * w, 2 * w, 4, 2, 1, bias=False),
            nn.BatchNorm2d(2 * w),
            nn.ReLU(True),  # (N, 2w, 8, 8)
            nn.ConvTranspose2d(2 * w, w, 4, 2, 1, bias=False),
            nn.BatchNorm2d(w),
            nn.ReLU(True),  # (N, w, 16, 16)
            nn.ConvTranspose2d(w, config.channels, 4, 2, 1),
            nn.Tanh(),  # (N, C, 32, 32)
        )
        self.apply(init_weights)

    def forward(self, z: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """(N, latent) float, (N,) int64 -> (N, C, 32, 32) floats in [-1, 1]."""
        c = self.config
        assert z.ndim == 2 and z.shape[1] == c.latent_size, f"expected z (N, {c.latent_size}), got {z.shape}"
        assert label.shape == z.shape[:1], f"expected label ({z.shape[0]},), got {tuple(label.shape)}"
        h = torch.cat([z, self.embed(label)], dim=1)  # (N, latent + E)
        return self.net(h[:, :, None, None])  # (N, C, 32, 32)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """tanh output in [-1, 1] -> uint8 pixels 0..255, the same arithmetic in torch and in the graph."""
    return torch.clamp(torch.round((images + 1.0) * 127.5), 0.0, 255.0).to(torch.uint8)


class Uint8Generator(nn.Module):
    """The exported form: the generator with the scaling to uint8 pixels inside the graph."""

    def __init__(self, generator: Generator) -> None:
        super().__init__()
        self.generator = generator

    def forward(self, z: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """(N, latent) float32, (N,) int64 -> (N, C, 32, 32) uint8."""
        return to_uint8(self.generator(z, label))


class Discriminator(nn.Module):
    """(image in [-1, 1], label) -> real/fake logit: 32x32 -> 16x16 -> 8x8 -> 4x4 -> linear + projection."""

    def __init__(self, config: DCGANConfig) -> None:
        super().__init__()
        self.config = config
        w, slope = config.d_width, config.leaky_slope
        self.net = nn.Sequential(
            nn.Conv2d(config.channels, w, 4, 2, 1),  # no batch norm on the input layer, as in the paper
            nn.LeakyReLU(slope, True),  # (N, w, 16, 16)
            nn.Conv2d(w, 2 * w, 4, 2, 1, bias=False),
            nn.BatchNorm2d(2 * w),
            nn.LeakyReLU(slope, True),  # (N, 2w, 8, 8)
            nn.Conv2d(2 * w, 4 * w, 4, 2, 1, bias=False),
            nn.BatchNorm2d(4 * w),
            nn.LeakyReLU(slope, True),  # (N, 4w, 4, 4)
        )
        features = 4 * w * 4 * 4
        self.out = nn.Linear(features, 1)
        self.embed = nn.Embedding(config.num_classes, features)  # the projection
        self.apply(init_weights)

    def forward(self, x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """(N, C, 32, 32) floats in [-1, 1], (N,) int64 -> (N,) logits (> 0: real)."""
        c = self.config
        assert x.ndim == 4 and x.shape[1:] == (c.channels, c.image_size, c.image_size), (
            f"expected (N, {c.channels}, {c.image_size}, {c.image_size}), got {tuple(x.shape)}"
        )
        h = torch.flatten(self.net(x), 1)  # (N, 16 * 4w)
        return self.out(h).squeeze(1) + (self.embed(label) * h).sum(1)  # (N,)


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy: real -> 1, fake -> 0."""
    return F.binary_cross_entropy_with_logits(
        real_logits, torch.ones_like(real_logits)
    ) + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))


def generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """The non-saturating loss, -log D(G(z)): strong gradients while D still wins easily."""
    return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))
