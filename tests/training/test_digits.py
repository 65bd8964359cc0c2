"""The digit splits: deterministic, stratified, disjoint, and upsampled with the server's resize."""

import numpy as np
import pytest
from sklearn.datasets import load_digits

from service.contract.preprocessing import levels_to_uint8, resize
from training.data.digits import DATA_DESCRIPTION, DigitSplits, load_digit_splits

SPLIT_NAMES = ("train", "validation", "test")


@pytest.fixture(scope="module")
def splits() -> DigitSplits:
    return load_digit_splits()


def test_split_is_deterministic(splits: DigitSplits) -> None:
    load_digit_splits.cache_clear()
    again = load_digit_splits()
    assert again is not splits
    for name in SPLIT_NAMES:
        a, b = getattr(splits, name), getattr(again, name)
        np.testing.assert_array_equal(a.indices, b.indices)
        np.testing.assert_array_equal(a.images, b.images)
        np.testing.assert_array_equal(a.labels, b.labels)


def test_splits_are_disjoint_and_cover_the_dataset(splits: DigitSplits) -> None:
    parts = [set(getattr(splits, name).indices.tolist()) for name in SPLIT_NAMES]
    assert sum(len(p) for p in parts) == len(set().union(*parts)) == 1797
    assert [len(getattr(splits, name)) for name in SPLIT_NAMES] == [1257, 180, 360]


def test_splits_are_stratified(splits: DigitSplits) -> None:
    total = np.bincount(load_digits().target, minlength=10)
    for name, fraction in zip(SPLIT_NAMES, (0.7, 0.1, 0.2), strict=True):
        counts = np.bincount(getattr(splits, name).labels, minlength=10)
        assert np.all(np.abs(counts - total * fraction) <= 2), f"{name}: {counts} vs {total * fraction}"


def test_shapes_and_dtypes(splits: DigitSplits) -> None:
    for name in SPLIT_NAMES:
        part = getattr(splits, name)
        n = len(part)
        assert part.images.shape == (n, 1, 32, 32) and part.images.dtype == np.uint8
        assert part.native.shape == (n, 8, 8) and part.native.dtype == np.uint8
        assert part.labels.shape == (n,) and part.labels.dtype == np.int64
        assert set(np.unique(part.labels)) == set(range(10))
        assert not part.images.flags.writeable, "cached arrays must be read-only"


def test_images_come_from_the_shared_helpers(splits: DigitSplits) -> None:
    source = load_digits()
    part = splits.test
    np.testing.assert_array_equal(part.native, levels_to_uint8(source.images[part.indices], 16))
    np.testing.assert_array_equal(part.labels, source.target[part.indices])
    for i in range(0, len(part), 37):
        np.testing.assert_array_equal(part.images[i, 0], resize(part.native[i], 32, 32))
    assert part.native.max() == 255 and part.native.min() == 0


def test_description_names_the_source() -> None:
    assert "load_digits" in DATA_DESCRIPTION
