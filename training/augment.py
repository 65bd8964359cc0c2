"""Augmentations applied to training batches, after the scenes are drawn.

Soft focus is one: held-out styles soften small shapes (a scene drawn on a large canvas and shrunk,
strong JPEG), and a model that has only seen crisp 7-pixel shapes mistakes a soft circle for a
square. Blurring a share of each batch at random teaches it that softness says nothing about shape,
without changing any split the models are evaluated on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BLUR_TAPS = 5  # kernel side: covers +-2 px, enough for sigma <= 1


def random_blur(
    images: torch.Tensor, generator: torch.Generator, probability: float, sigma: tuple[float, float]
) -> torch.Tensor:
    """A Gaussian blur of a random sigma in `sigma` (px) on each image with `probability`.

    `images` are (N, C, H, W) uint8 and stay so; the others are returned unchanged; the input is
    not modified. Edges repeat the border pixel, so a background does not darken at the frame.
    """
    chosen = torch.rand(len(images), generator=generator) < probability
    count = int(chosen.sum())
    if count == 0:
        return images
    sigmas = sigma[0] + (sigma[1] - sigma[0]) * torch.rand(count, generator=generator)
    offsets = torch.arange(BLUR_TAPS, dtype=torch.float32) - BLUR_TAPS // 2
    taps = torch.exp(-(offsets[None, :] ** 2) / (2 * sigmas[:, None] ** 2))
    taps = taps / taps.sum(dim=1, keepdim=True)
    kernels = taps[:, :, None] * taps[:, None, :]  # (count, taps, taps), separable
    selected = images[chosen].float()
    _, channels, height, width = selected.shape
    weight = kernels.repeat_interleave(channels, dim=0)[:, None]  # one kernel per image channel
    pad = BLUR_TAPS // 2
    planes = F.pad(
        selected.reshape(1, count * channels, height, width), (pad, pad, pad, pad), mode="replicate"
    )
    blurred = F.conv2d(planes, weight, groups=count * channels).reshape(count, channels, height, width)
    out = images.clone()
    out[chosen] = blurred.round().clamp(0, 255).to(images.dtype)
    return out
