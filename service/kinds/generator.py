"""Generator pipeline: (seed, labels, count) -> latents and labels -> uint8 images -> PNGs."""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from service.contract.manifest import GeneratorSpec, Manifest
from service.engine.sessions import ModelLoadError, ModelSession
from service.errors import InvalidArgument
from service.kinds.checks import require_finite, require_within


@dataclass(frozen=True)
class Plan:
    """What one Generate call will run: latents (count, latent_size) and class indices (count,)."""

    seed: int
    latents: np.ndarray
    labels: np.ndarray


class GeneratorPipeline:
    """Draws latents from numpy's PCG64 with the request's seed, so a seed names its images."""

    def __init__(self, manifest: Manifest, session: ModelSession) -> None:
        assert manifest.generator is not None and manifest.labels, "the manifest validator requires them"
        self.manifest = manifest
        self.session = session
        self.spec: GeneratorSpec = manifest.generator
        self.labels = manifest.labels
        for name in (self.spec.latent_input, self.spec.label_input):
            if name not in session.input_names:
                raise ModelLoadError(f"the ONNX graph has no input {name!r} (it has {session.input_names})")
        if self.spec.output not in session.output_names:
            raise ModelLoadError(f"the ONNX graph has no output {self.spec.output!r}")
        self._output_index = session.output_names.index(self.spec.output)

    def plan(self, count: int, labels: list[int], seed: int) -> Plan:
        """Latents first, then any random labels, from one PCG64 stream seeded by `seed`."""
        classes = len(self.labels)
        if len(labels) not in (0, 1, count):
            raise InvalidArgument(f"{len(labels)} labels for {count} images: give none, one or one per image")
        bad = [label for label in labels if not 0 <= label < classes]
        if bad:
            shown = ", ".join(str(label) for label in bad[:3]) + (
                f" and {len(bad) - 3} more" if len(bad) > 3 else ""
            )
            raise InvalidArgument(f"label {shown} outside the classes 0..{classes - 1}")
        rng = np.random.Generator(np.random.PCG64(seed))
        latents = rng.standard_normal((count, self.spec.latent_size), dtype=np.float32)
        if not labels:
            chosen = rng.integers(0, classes, size=count, dtype=np.int64)
        else:
            chosen = np.resize(np.asarray(labels, dtype=np.int64), count)
        return Plan(seed, latents, chosen)

    @property
    def feeds_check(self) -> Callable[[dict[str, np.ndarray]], None]:
        """What the batcher checks each request with before it joins a batch."""
        return self.check_feeds

    def check_feeds(self, feeds: dict[str, np.ndarray]) -> None:
        """One request's arrays (task API or KServe v2): finite latents, labels among the classes."""
        require_finite(feeds[self.spec.latent_input], self.spec.latent_input)
        classes = len(self.labels)
        require_within(
            feeds[self.spec.label_input],
            self.spec.label_input,
            0,
            classes - 1,
            f"the model's {classes} classes",
        )

    def feeds(self, plan: Plan) -> dict[str, np.ndarray]:
        return {self.spec.latent_input: plan.latents, self.spec.label_input: plan.labels}

    def images(self, outputs: list[np.ndarray]) -> np.ndarray:
        """The generated uint8 images, (N, C, H, W)."""
        return outputs[self._output_index]

    def warmup(self) -> None:
        images = self.images(self.session.run(self.feeds(self.plan(1, [0], seed=0))))
        spec = self.spec
        if images.shape != (1, spec.channels, spec.height, spec.width) or images.dtype != np.uint8:
            raise ModelLoadError(
                f"the model makes {images.dtype} images of shape {images.shape[1:]}, "
                f"the manifest says uint8 {(spec.channels, spec.height, spec.width)}"
            )


def to_png(image: np.ndarray) -> bytes:
    """One (C, H, W) uint8 image as PNG."""
    pixels = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG")
    return buffer.getvalue()


def grid_png(images: np.ndarray, columns: int | None = None, gap: int = 2) -> bytes:
    """All images in one PNG, `columns` per row (default: a near-square grid), on a black ground."""
    count, channels, height, width = images.shape
    columns = columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    canvas = np.zeros((channels, rows * (height + gap) - gap, columns * (width + gap) - gap), np.uint8)
    for index, image in enumerate(images):
        top, left = (index // columns) * (height + gap), (index % columns) * (width + gap)
        canvas[:, top : top + height, left : left + width] = image
    return to_png(canvas)
