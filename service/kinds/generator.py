"""Generator pipeline: (seed, labels, count) -> latents and labels -> uint8 images -> PNGs."""

from __future__ import annotations

import io
import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
from PIL import Image

from service.codecs.cost import INLINE, Codec, Work
from service.contract.manifest import GeneratorSpec, Manifest
from service.domain import GeneratedImage, GenerateRequest, GenerateResult, LatentRequest, LatentResult
from service.engine.batching import DynamicBatcher
from service.engine.sessions import ModelLoadError, ModelSession
from service.errors import InvalidArgument
from service.kinds.base import MODEL_FILE, LoadContext, TaskName
from service.kinds.checks import require_finite, require_within
from service.kinds.tensor import TensorModel, tensor_model
from service.observability.statistics import RequestTimes


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

    def plan(self, count: int, labels: list[int], seed: int, latents: np.ndarray | None = None) -> Plan:
        """Latents first, then any random labels, from one PCG64 stream seeded by `seed`; given
        `latents` (count, latent_size) take the place of the drawn ones."""
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
        drawn = self._draw(rng, count)
        if latents is None:
            latents = drawn
        elif latents.shape != drawn.shape:
            raise InvalidArgument(
                f"latents have shape {list(latents.shape)}; this model takes "
                f"{count} x {self.spec.latent_size}"
            )
        if not labels:
            chosen = rng.integers(0, classes, size=count, dtype=np.int64)
        else:
            chosen = np.resize(np.asarray(labels, dtype=np.int64), count)
        return Plan(seed, latents, chosen)

    def latents(self, count: int, seed: int) -> np.ndarray:
        """The latents `plan` draws for `seed`: float32 (count, latent_size)."""
        return self._draw(np.random.Generator(np.random.PCG64(seed)), count)

    def _draw(self, rng: np.random.Generator, count: int) -> np.ndarray:
        return rng.standard_normal((count, self.spec.latent_size), dtype=np.float32)

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


class GeneratorKind:
    """Kind `generator`: (count, labels, seed) in, images out (Generate), and its graph over KServe v2."""

    name = "generator"
    answers: ClassVar[Mapping[type, TaskName]] = {
        GenerateRequest: TaskName("generator", "dcgan"),
        LatentRequest: TaskName("generator", "dcgan"),
    }

    def load(self, manifest: Manifest, version_dir: Path, context: LoadContext) -> TensorModel:
        session = context.session(version_dir, MODEL_FILE)
        pipeline = GeneratorPipeline(manifest, session)
        context.warm_up(session.warmup, pipeline.warmup)
        model = tensor_model(
            context.model, manifest, session, context, context.stats, check=pipeline.check_feeds
        )
        limit = context.settings.max_generate_count
        model.tasks[GenerateRequest] = lambda request: GenerateJob(request, pipeline, model.batcher, limit)
        model.tasks[LatentRequest] = lambda request: LatentJob(request, pipeline, model.batcher, limit)
        return model


class GenerateJob:
    """Draw the latents, run them, encode the images as PNG (in a thread: PNG encoding is slow)."""

    prepare_work = INLINE

    def __init__(
        self, request: GenerateRequest, pipeline: GeneratorPipeline, batcher: DynamicBatcher, limit: int
    ) -> None:
        count = request.image_count
        if request.count is not None and request.count != count:
            raise InvalidArgument(f"count is {request.count} but {count} latent vectors were given")
        _check_count_and_seed(count, request.seed, limit)
        self._pipeline = pipeline
        self._grid = request.grid
        self._plan = pipeline.plan(count, list(request.labels), _seed(request), request.latents)
        self.rows = count
        self.batcher = batcher
        spec = pipeline.spec
        self.finish_work = Work(Codec.PNG, count * spec.height * spec.width)
        self._outputs: list[np.ndarray] = []

    def prepare(self) -> None:
        """The latents were drawn when the job was planned: nothing to decode."""

    async def run(self, deadline: float | None, times: RequestTimes) -> None:
        self._outputs = await self.batcher.submit(self._pipeline.feeds(self._plan), deadline, times)

    def finish(self) -> GenerateResult:
        images = self._pipeline.images(self._outputs)
        if self._grid:
            pngs, grid = [b""] * len(images), grid_png(images)
        else:
            pngs, grid = [to_png(image) for image in images], b""
        labels = self._pipeline.labels
        generated = [
            GeneratedImage(png=png, label_index=int(i), label=labels[int(i)])
            for png, i in zip(pngs, self._plan.labels, strict=True)
        ]
        return GenerateResult(seed=self._plan.seed, images=generated, grid_png=grid)


class LatentJob:
    """The latents a seed draws: no rows for the batcher and no model run (the data plane only
    calls `finish`)."""

    rows = 0
    prepare_work = INLINE
    finish_work = INLINE

    def __init__(
        self, request: LatentRequest, pipeline: GeneratorPipeline, batcher: DynamicBatcher, limit: int
    ) -> None:
        self._pipeline = pipeline
        self._count = 1 if request.count is None else request.count
        _check_count_and_seed(self._count, request.seed, limit)
        self._seed = _seed(request)
        self.batcher = batcher

    def prepare(self) -> None:
        """Nothing to decode."""

    async def run(self, deadline: float | None, times: RequestTimes) -> None:
        """Nothing to run."""

    def finish(self) -> LatentResult:
        return LatentResult(seed=self._seed, latents=self._pipeline.latents(self._count, self._seed))


def _check_count_and_seed(count: int, seed: int | None, limit: int) -> None:
    """1..max_generate_count images, and a seed PCG64 takes (unsigned, 64 bits)."""
    if not 1 <= count <= limit:
        raise InvalidArgument(f"count must be 1..{limit}, got {count}")
    if seed is not None and not 0 <= seed < 2**64:
        raise InvalidArgument(f"seed must be 0..2**64-1, got {seed}")


def _seed(request: GenerateRequest | LatentRequest) -> int:
    """The request's seed, or a fresh one (the response names it, so the images can be made again)."""
    return secrets.randbits(63) if request.seed is None else request.seed
