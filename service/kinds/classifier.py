"""Classifier pipeline: images -> the model's input distribution -> logits -> ranked predictions."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

import numpy as np

from service.codecs.cost import INLINE
from service.codecs.images import decode_images, image_work
from service.contract import preprocessing as imaging
from service.contract.manifest import DigitAdaptation, Manifest
from service.domain import ClassifyRequest, ClassifyResult, Prediction
from service.engine.batching import DynamicBatcher
from service.engine.sessions import ModelLoadError, ModelSession
from service.errors import InvalidArgument
from service.kinds.base import MODEL_FILE, LoadContext, TaskName
from service.kinds.checks import require_image_count
from service.kinds.tensor import TensorModel, tensor_model
from service.observability.statistics import RequestTimes
from service.settings import Settings


class ClassifierPipeline:
    """Turns decoded images into a uint8 (N, C, H, W) batch and logits into top-k predictions."""

    def __init__(self, manifest: Manifest, session: ModelSession) -> None:
        assert manifest.input is not None and manifest.labels, "the manifest validator requires them"
        self.manifest = manifest
        self.session = session
        self.spec = spec = manifest.input
        self.labels = manifest.labels
        if spec.name not in session.input_names:
            raise ModelLoadError(f"the ONNX graph has no input {spec.name!r} (it has {session.input_names})")
        if manifest.output_name not in session.output_names:
            raise ModelLoadError(f"the ONNX graph has no output {manifest.output_name!r}")
        self._output_index = session.output_names.index(manifest.output_name)

    def prepare(self, image: np.ndarray) -> np.ndarray:
        """One decoded image -> (C, H, W) uint8 in the training distribution."""
        spec = self.spec
        image = imaging.to_color_mode(image, spec.color_mode)
        if isinstance(self.manifest.adaptation, DigitAdaptation):
            image = imaging.adapt_digit(image, self.manifest.adaptation, spec.height, spec.width)
        else:
            image = imaging.resize(image, spec.height, spec.width)
        return image[np.newaxis] if image.ndim == 2 else image.transpose(2, 0, 1)

    def feeds(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """The graph inputs for a (N, C, H, W) batch."""
        return {self.spec.name: batch}

    def logits(self, outputs: list[np.ndarray]) -> np.ndarray:
        """The logits among the graph outputs."""
        return outputs[self._output_index]

    def rank(self, logits: np.ndarray, top_k: int) -> list[list[Prediction]]:
        """Softmax and the top_k classes per row, best first."""
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        k = min(top_k, probs.shape[1])
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        labels = self.labels
        # plain Python numbers in one go (tolist), not a numpy scalar per value
        return [
            [Prediction(labels[i], i, row[i]) for i in indices]
            for row, indices in zip(probs.tolist(), order.tolist(), strict=True)
        ]

    def warmup(self) -> None:
        """One run at batch 1 so the first request does not pay for lazy initialisation."""
        spec = self.spec
        batch = np.zeros((1, spec.channels, spec.height, spec.width), dtype=np.uint8)
        logits = self.logits(self.session.run(self.feeds(batch)))
        if logits.shape != (1, len(self.labels)):
            raise ModelLoadError(
                f"the model answers logits of shape {logits.shape} for one image, "
                f"but the manifest lists {len(self.labels)} labels"
            )


class ClassifierKind:
    """Kind `classifier`: images in, ranked labels out (Classify), and its graph over KServe v2."""

    name = "classifier"
    answers: ClassVar[Mapping[type, TaskName]] = {ClassifyRequest: TaskName("classifier", "lenet5")}

    def load(self, manifest: Manifest, version_dir: Path, context: LoadContext) -> TensorModel:
        session = context.session(version_dir, MODEL_FILE)
        pipeline = ClassifierPipeline(manifest, session)
        context.warm_up(session.warmup, pipeline.warmup)
        model = tensor_model(context.model, manifest, session, context, context.stats)
        model.labels[manifest.output_name] = pipeline.labels
        settings = context.settings

        def classify(request: ClassifyRequest) -> ClassifyJob:
            return ClassifyJob(request, pipeline, model.batcher, settings)

        model.tasks[ClassifyRequest] = classify
        return model


class ClassifyJob:
    """Decode and pre-process the images, run the batch, rank each row."""

    finish_work = INLINE

    def __init__(
        self,
        request: ClassifyRequest,
        pipeline: ClassifierPipeline,
        batcher: DynamicBatcher,
        settings: Settings,
    ) -> None:
        if request.top_k is not None and request.top_k <= 0:
            raise InvalidArgument(f"top_k must be > 0, got {request.top_k}")
        require_image_count(len(request.images), settings)
        self._images = request.images
        self._top_k = settings.default_top_k if request.top_k is None else request.top_k
        self._pipeline = pipeline
        self._limits = settings.max_image_pixels, settings.max_request_pixels
        self.batcher = batcher
        self.rows = len(request.images)
        self.prepare_work = image_work(request.images)
        self._batch = np.empty(0)
        self._outputs: list[np.ndarray] = []

    def prepare(self) -> None:
        pipeline = self._pipeline
        prepared = [pipeline.prepare(image) for image in decode_images(self._images, *self._limits)]
        if len(prepared) == 1:  # np.stack's generic machinery costs more than the copy it makes
            self._batch = np.ascontiguousarray(prepared[0])[np.newaxis]
        else:
            self._batch = np.stack(prepared)

    async def run(self, deadline: float | None, times: RequestTimes) -> None:
        self._outputs = await self.batcher.submit(self._pipeline.feeds(self._batch), deadline, times)

    def finish(self) -> ClassifyResult:
        pipeline = self._pipeline
        return ClassifyResult(results=pipeline.rank(pipeline.logits(self._outputs), self._top_k))
