"""Soft focus on training batches: a blur that keeps uint8 images, plain colours and the input."""

from __future__ import annotations

import torch

from training.augment import random_blur


def noise(count: int = 16) -> torch.Tensor:
    return torch.randint(0, 256, (count, 3, 32, 32), generator=torch.Generator().manual_seed(0)).to(
        torch.uint8
    )


def test_probability_zero_leaves_the_batch_alone_and_one_blurs_every_image() -> None:
    images = noise()
    untouched = random_blur(images, torch.Generator().manual_seed(1), 0.0, (0.3, 0.9))
    assert torch.equal(untouched, images)
    blurred = random_blur(images, torch.Generator().manual_seed(1), 1.0, (0.3, 0.9))
    assert blurred.dtype == torch.uint8 and blurred.shape == images.shape
    assert all(not torch.equal(a, b) for a, b in zip(blurred, images, strict=True))
    assert torch.equal(images, noise()), "the input batch was modified"


def test_a_plain_colour_stays_plain_up_to_the_frame() -> None:
    images = torch.full((4, 3, 16, 16), 200, dtype=torch.uint8)
    images[:, 1] = 30
    assert torch.equal(random_blur(images, torch.Generator().manual_seed(2), 1.0, (0.3, 0.9)), images)


def test_a_wider_sigma_smooths_more_and_keeps_the_mean() -> None:
    images = noise(8)
    soft = random_blur(images, torch.Generator().manual_seed(3), 1.0, (0.4, 0.4)).float()
    softer = random_blur(images, torch.Generator().manual_seed(3), 1.0, (0.9, 0.9)).float()
    assert softer.std() < soft.std() < images.float().std()
    assert abs(softer.mean() - images.float().mean()) < 1.0


def test_the_share_blurred_follows_the_probability() -> None:
    images = noise(400)
    blurred = random_blur(images, torch.Generator().manual_seed(4), 0.4, (0.3, 0.9))
    share = sum(not torch.equal(a, b) for a, b in zip(blurred, images, strict=True)) / len(images)
    assert 0.3 < share < 0.5
