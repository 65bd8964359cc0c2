"""Turn request images (encoded bytes or raw arrays) into numpy uint8 arrays, or say what is wrong."""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from service.codecs.cost import Codec, Work, checkpoint
from service.domain import EncodedImage, ImageInput, RawImage, image_bytes
from service.errors import InvalidArgument

ACCEPTED_FORMATS = ("PNG", "JPEG", "BMP")
RAW_CHANNELS = (1, 3, 4)


def decode_encoded(data: bytes, max_pixels: int) -> np.ndarray:
    """Decode PNG/JPEG/BMP bytes to (H, W) grey or (H, W, 3) RGB uint8.

    The size in the header is checked before any pixel is decoded, so a small file that
    claims a huge image costs nothing. Transparent images are put on white, as on paper.
    """
    if not data:
        raise InvalidArgument("image is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit follows
            image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except Image.DecompressionBombError:
        raise InvalidArgument(f"image claims more pixels than the limit of {max_pixels} pixels") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):  # PIL's ways of saying "not valid"
        raise InvalidArgument(
            f"image bytes are not a {', '.join(ACCEPTED_FORMATS)} image (or are corrupt)"
        ) from None
    width, height = image.size
    if width * height > max_pixels:
        raise InvalidArgument(f"image is {width}x{height} pixels, over the limit of {max_pixels} pixels")
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidArgument(f"image bytes are truncated or corrupt ({image.format}: {exc})") from None
    return np.asarray(_to_l_or_rgb(image))


def _to_l_or_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("L", "RGB"):
        return image
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        paper = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(paper, rgba).convert("RGB")
    if image.mode in ("1", "I", "I;16", "F"):
        return image.convert("L")
    return image.convert("RGB")


def decode_raw(data: bytes, height: int, width: int, channels: int, max_pixels: int) -> np.ndarray:
    """Check a raw uint8 (height, width, channels) buffer against its shape and wrap it, no copy."""
    if height <= 0 or width <= 0:
        raise InvalidArgument(f"raw image has a zero size ({height}x{width}); height and width must be > 0")
    if channels not in RAW_CHANNELS:
        raise InvalidArgument(f"raw image has {channels} channels; expected one of {RAW_CHANNELS}")
    if height * width > max_pixels:
        raise InvalidArgument(f"raw image is {width}x{height} pixels, over the limit of {max_pixels} pixels")
    expected = height * width * channels
    if len(data) != expected:
        raise InvalidArgument(
            f"raw image data is {len(data)} bytes but {height}x{width}x{channels} uint8 needs {expected}"
        )
    array = np.frombuffer(data, dtype=np.uint8).reshape(height, width, channels)
    return array[:, :, 0] if channels == 1 else array


def decode_image(image: ImageInput, index: int, max_pixels: int) -> np.ndarray:
    """A request's image number `index` as uint8 pixels; errors name the image."""
    try:
        if isinstance(image, EncodedImage):
            return decode_encoded(image.data, max_pixels)
        if isinstance(image, RawImage):
            return decode_raw(image.data, image.height, image.width, image.channels, max_pixels)
        raise InvalidArgument("image has neither encoded bytes nor a raw array")
    except InvalidArgument as exc:
        raise InvalidArgument(f"image {index}: {exc}") from None


def declared_pixels(image: ImageInput) -> int:
    """The pixels an image says it has, from its header only (no pixel is decoded); 0 when it
    cannot be read (decoding will say what is wrong)."""
    if isinstance(image, RawImage):
        return max(image.height, 0) * max(image.width, 0)
    if not isinstance(image, EncodedImage) or not image.data:
        return 0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(image.data), formats=ACCEPTED_FORMATS) as opened:
                width, height = opened.size
    except Exception:  # any unreadable header: decode_encoded reports what is wrong
        return 0
    return width * height


def image_work(images: Sequence[ImageInput]) -> Work:
    """What decoding and pre-processing a request's images costs, by the cost rule.

    A request whose compressed bytes alone would go to a thread is not looked at further; a small
    one is judged by the pixels its headers declare (a 2 KB PNG may claim 16 million pixels).
    """
    by_bytes = Work(Codec.IMAGE, image_bytes(images))
    if not by_bytes.inline:
        return by_bytes
    return Work(Codec.PIXELS, sum(declared_pixels(image) for image in images))


def decode_images(
    images: Sequence[ImageInput], max_pixels: int, max_request_pixels: int
) -> Iterator[np.ndarray]:
    """A request's images decoded one by one: all their headers first against `max_request_pixels`
    (the decoded pixels one request may cost), then each image, stopping between images when the
    call's deadline passed or it was cancelled (`checkpoint`)."""
    total = sum(declared_pixels(image) for image in images)
    if total > max_request_pixels:
        raise InvalidArgument(
            f"the request's {len(images)} images hold {total} pixels, over the limit of "
            f"{max_request_pixels} pixels per request (max_request_pixels)"
        )
    for index, image in enumerate(images):
        checkpoint()
        yield decode_image(image, index, max_pixels)
