"""Image helpers shared by the trainer and the server, so both see images the same way.

Images here are numpy uint8 arrays, (H, W) for grey and (H, W, C) for colour.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

from service.contract.manifest import DigitAdaptation

#: Below this spread between dark and bright pixels an image is treated as blank.
_MIN_CONTRAST = 32
#: At most this many one-pixel dilations or erosions to match the training pen's thickness.
_MAX_PEN_STEPS = 8


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize; the one resize that the trainer and the server both use."""
    if image.shape[:2] == (height, width):
        return image
    pil = Image.fromarray(image)
    return np.asarray(pil.resize((width, height), Image.Resampling.BILINEAR))


def to_color_mode(image: np.ndarray, mode: str) -> np.ndarray:
    """Convert to "L" (H, W) or "RGB" (H, W, 3) with PIL's standard luma weights."""
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    current = "L" if image.ndim == 2 else {3: "RGB", 4: "RGBA"}[image.shape[2]]
    if current == mode:
        return image
    return np.asarray(Image.fromarray(image, mode=current).convert(mode))


def levels_to_uint8(levels: np.ndarray, max_level: int) -> np.ndarray:
    """Map integer grey levels 0..max_level to 0..255."""
    scaled = np.rint(levels.astype(np.float64) * (255.0 / max_level))
    return scaled.astype(np.uint8)


def is_bright_on_dark(gray: np.ndarray) -> bool:
    """True when the border (the background) is darker than mid-grey."""
    border = np.sort(np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]]))
    middle = border.size // 2  # the median as np.median takes it, without its generic machinery
    median = (int(border[(border.size - 1) // 2]) + int(border[middle])) / 2
    return median < 128.0


def adapt_digit(gray: np.ndarray, spec: DigitAdaptation, height: int, width: int) -> np.ndarray:
    """Bring a grey digit image of any size and polarity to the training distribution.

    Images already in the training representation (bright on dark, at the source resolution
    or at the model's input size) are only resized. Everything else takes the path the
    training data took: binarise, crop to the ink, fit the canvas, match the training pen's
    thickness, block-average to the source resolution (which yields `levels` grey levels),
    then resize to the model input.
    """
    in_training_size = gray.shape in ((spec.source_size, spec.source_size), (height, width))
    bright_on_dark = is_bright_on_dark(gray)
    if in_training_size and bright_on_dark:
        return resize(gray, height, width)
    if not bright_on_dark:
        gray = 255 - gray
    ink = _binarise(gray)
    if not ink.any():
        return np.zeros((height, width), dtype=np.uint8)
    canvas = _fit_to_canvas(_crop_to_content(ink), spec.canvas)
    canvas = _match_ink_fraction(canvas, spec.ink_fraction)
    source = _block_levels(canvas, spec.canvas // spec.source_size)
    return resize(levels_to_uint8(source, spec.levels - 1), height, width)


def _binarise(gray: np.ndarray) -> np.ndarray:
    """Ink mask with a threshold halfway between background and ink (robust percentiles)."""
    low, high = np.percentile(gray, [1, 99])
    if high - low < _MIN_CONTRAST:
        return np.zeros(gray.shape, dtype=bool)
    return gray > (low + high) / 2.0


def _crop_to_content(mask: np.ndarray) -> np.ndarray:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def _fit_to_canvas(mask: np.ndarray, canvas: int) -> np.ndarray:
    """Scale the longer side to the canvas, keep the aspect ratio, centre the result."""
    h, w = mask.shape
    scale = canvas / max(h, w)
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    scaled = resize(mask.astype(np.uint8) * 255, new_h, new_w) >= 128
    out = np.zeros((canvas, canvas), dtype=bool)
    top, left = (canvas - new_h) // 2, (canvas - new_w) // 2
    out[top : top + new_h, left : left + new_w] = scaled
    return out


def _match_ink_fraction(mask: np.ndarray, target: float) -> np.ndarray:
    """Dilate or erode one pixel at a time until the share of ink is closest to the target."""
    best = mask
    grow = mask.mean() < target
    step = ImageFilter.MaxFilter(3) if grow else ImageFilter.MinFilter(3)
    image = Image.fromarray(mask.astype(np.uint8) * 255)
    for _ in range(_MAX_PEN_STEPS):
        image = image.filter(step)
        candidate = np.asarray(image) >= 128
        if not candidate.any() or abs(candidate.mean() - target) >= abs(best.mean() - target):
            break
        best = candidate
    return best


def _block_levels(mask: np.ndarray, block: int) -> np.ndarray:
    """Count ink pixels per block x block cell: 0..block*block, as the training data did."""
    n = mask.shape[0] // block
    return mask.reshape(n, block, n, block).sum(axis=(1, 3))
