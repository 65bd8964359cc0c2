"""The image path that brings real digits to the training distribution."""

from __future__ import annotations

import numpy as np
from drawing import draw_digit

from service.contract import preprocessing as imaging
from service.contract.manifest import DigitAdaptation

SPEC = DigitAdaptation()


def _ink_fraction(image: np.ndarray) -> float:
    return float((image > 127).mean())


def test_training_representation_is_only_resized() -> None:
    native = (np.arange(64).reshape(8, 8) * 4).astype(np.uint8)
    native[0, :] = native[-1, :] = native[:, 0] = native[:, -1] = 0
    np.testing.assert_array_equal(imaging.adapt_digit(native, SPEC, 32, 32), imaging.resize(native, 32, 32))
    upsampled = imaging.resize(native, 32, 32)
    np.testing.assert_array_equal(imaging.adapt_digit(upsampled, SPEC, 32, 32), upsampled)


def test_polarity_is_the_border_median_below_mid_grey() -> None:
    rng = np.random.default_rng(0)
    for _ in range(2000):
        height, width = rng.integers(1, 12, 2)
        gray = rng.choice(np.array([0, 126, 127, 128, 129, 255], np.uint8), (height, width))
        border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
        assert imaging.is_bright_on_dark(gray) == (float(np.median(border)) < 128.0), gray


def test_polarity_is_detected_and_fixed() -> None:
    dark_on_light = np.asarray(draw_digit("7"))
    light_on_dark = 255 - dark_on_light
    assert not imaging.is_bright_on_dark(dark_on_light)
    assert imaging.is_bright_on_dark(light_on_dark)
    np.testing.assert_array_equal(
        imaging.adapt_digit(dark_on_light, SPEC, 32, 32), imaging.adapt_digit(light_on_dark, SPEC, 32, 32)
    )


def test_output_has_the_training_grey_levels_before_upsampling() -> None:
    adapted = imaging.adapt_digit(np.asarray(draw_digit("3", size=500)), SPEC, 8, 8)
    allowed = set(imaging.levels_to_uint8(np.arange(17), 16).tolist())
    assert set(np.unique(adapted).tolist()) <= allowed


def test_pen_thickness_is_normalised() -> None:
    thin = imaging.adapt_digit(np.asarray(draw_digit("4", pen=4)), SPEC, 32, 32)
    thick = imaging.adapt_digit(np.asarray(draw_digit("4", pen=40)), SPEC, 32, 32)
    assert abs(_ink_fraction(thin) - _ink_fraction(thick)) < 0.1


def test_size_does_not_matter() -> None:
    small = imaging.adapt_digit(np.asarray(draw_digit("2", size=64, pen=4)), SPEC, 32, 32)
    large = imaging.adapt_digit(np.asarray(draw_digit("2", size=800, pen=50)), SPEC, 32, 32)
    assert np.abs(small.astype(int) - large.astype(int)).mean() < 25


def test_blank_image_gives_a_blank_input() -> None:
    blank = np.full((100, 100), 200, np.uint8)
    assert not imaging.adapt_digit(blank, SPEC, 32, 32).any()


def test_digit_is_centred_and_fills_the_height() -> None:
    image = np.full((300, 300), 255, np.uint8)
    image[20:120, 200:230] = 0  # a "1" in the top-right corner
    adapted = imaging.adapt_digit(image, SPEC, 32, 32)
    rows = np.flatnonzero(adapted.max(axis=1) > 64)
    cols = np.flatnonzero(adapted.max(axis=0) > 64)
    assert rows[0] <= 1 and rows[-1] >= 30
    assert abs((cols[0] + cols[-1]) / 2 - 15.5) <= 1.5


def test_color_modes() -> None:
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[..., 0] = 255
    grey = imaging.to_color_mode(rgb, "L")
    assert grey.shape == (4, 4)
    assert grey[0, 0] == 76  # ITU-R 601-2 luma of pure red
    assert imaging.to_color_mode(grey, "RGB").shape == (4, 4, 3)
    assert imaging.to_color_mode(grey[:, :, None], "L").shape == (4, 4)
