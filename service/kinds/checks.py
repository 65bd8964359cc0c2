"""Value checks on one request's input arrays, before it joins a batch.

The kinds call these for what their graphs cannot take (a label beyond the classes, a token
beyond the vocabulary, a NaN latent), so such a request is refused alone with INVALID_ARGUMENT and
a message that names the input, the bad value and what is allowed. Dtypes and shapes are checked
earlier, against the graph (KServe) or by building the arrays (task API).
"""

from __future__ import annotations

import numpy as np

from service.errors import InvalidArgument, clip
from service.settings import Settings


def require_finite(array: np.ndarray, name: str) -> None:
    """Every element of a float input is a number (no NaN, no infinity)."""
    if array.dtype.kind != "f" or bool(np.isfinite(array).all()):
        return
    position = _first(~np.isfinite(array))
    raise InvalidArgument(
        f"input {clip(name)}: {array[position]} at index {list(position)} is not a finite number"
    )


def require_within(array: np.ndarray, name: str, low: int, high: int, allowed: str) -> None:
    """Every element of an integer input is in low..high (inclusive); `allowed` says what that range is."""
    if array.size == 0:
        return
    lowest, highest = array.min(), array.max()
    if lowest >= low and highest <= high:
        return
    position = _first((array < low) | (array > high))
    raise InvalidArgument(
        f"input {clip(name)}: {array[position]} at index {list(position)} "
        f"is outside {low}..{high} ({allowed})"
    )


def require_image_count(count: int, settings: Settings) -> None:
    """A task request brings 1..max_images_per_request images."""
    if count == 0:
        raise InvalidArgument("no images in the request")
    limit = settings.max_images_per_request
    if count > limit:
        raise InvalidArgument(f"{count} images in one request; at most {limit} (max_images_per_request)")


def _first(mask: np.ndarray) -> tuple[int, ...]:
    """The index of the first True element of a non-empty mask with at least one."""
    return tuple(int(i) for i in np.argwhere(mask)[0])
