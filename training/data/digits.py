"""scikit-learn's handwritten digits as uint8 images, split once and for all.

The images go through the same helpers the server uses (`service.contract.preprocessing`), so a
digit sent to the server at 8x8 is upsampled exactly as the training images were.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from service.contract.preprocessing import levels_to_uint8, resize

#: Fixed seed of the split: independent of the training seed, so every run sees the same test set.
SPLIT_SEED = 20240611
#: Side of the model input; the 8x8 digits are resized to it.
IMAGE_SIZE = 32
#: Grey levels of the source images are 0..MAX_LEVEL.
MAX_LEVEL = 16
VALIDATION_FRACTION = 0.10
TEST_FRACTION = 0.20

DATA_DESCRIPTION = (
    "scikit-learn load_digits (UCI optical recognition of handwritten digits, 1797 images, "
    f"8x8, levels 0..{MAX_LEVEL}) scaled to uint8 and bilinearly resized to {IMAGE_SIZE}x{IMAGE_SIZE}; "
    f"stratified split 70/10/20 with seed {SPLIT_SEED}"
)


@dataclass(frozen=True)
class DigitSplit:
    """One split of the digits, in the order of `indices` (positions in `load_digits()`).

    `images` (N, 1, 32, 32) uint8 are the model inputs; `native` (N, 8, 8) uint8 are the same
    digits before upsampling, e.g. to send to the server at their original size.
    """

    images: np.ndarray
    labels: np.ndarray  # (N,) int64
    native: np.ndarray
    indices: np.ndarray  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class DigitSplits:
    """The train, validation and test splits; disjoint and stratified by label."""

    train: DigitSplit
    validation: DigitSplit
    test: DigitSplit


def to_model_input(native: np.ndarray) -> np.ndarray:
    """(N, 8, 8) uint8 -> (N, 1, 32, 32) uint8 with the server's resize."""
    assert native.ndim == 3 and native.dtype == np.uint8, f"expected (N, H, W) uint8, got {native.shape}"
    upsampled = np.stack([resize(image, IMAGE_SIZE, IMAGE_SIZE) for image in native])
    return upsampled[:, None, :, :]


@lru_cache(maxsize=1)
def load_digit_splits() -> DigitSplits:
    """Load, convert and split the digits; cached, so the arrays are read-only."""
    bunch = load_digits()
    native = levels_to_uint8(bunch.images, MAX_LEVEL)  # (1797, 8, 8) uint8
    labels = bunch.target.astype(np.int64)
    indices = np.arange(len(labels), dtype=np.int64)
    rest, test = train_test_split(indices, test_size=TEST_FRACTION, stratify=labels, random_state=SPLIT_SEED)
    train, validation = train_test_split(
        rest,
        test_size=VALIDATION_FRACTION / (1.0 - TEST_FRACTION),
        stratify=labels[rest],
        random_state=SPLIT_SEED,
    )
    images = to_model_input(native)

    def split(idx: np.ndarray) -> DigitSplit:
        idx = np.sort(idx)
        part = DigitSplit(images=images[idx], labels=labels[idx], native=native[idx], indices=idx)
        for array in (part.images, part.labels, part.native, part.indices):
            array.flags.writeable = False  # shared through the cache
        return part

    return DigitSplits(train=split(train), validation=split(validation), test=split(test))
