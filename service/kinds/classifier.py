"""Classifier pipeline: images -> the model's input distribution -> logits -> ranked predictions."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from service.codecs.cost import INLINE, Codec, Work
from service.codecs.images import decode_image
from service.contract import preprocessing as imaging
from service.contract.manifest import DigitAdaptation, Manifest
from service.domain import ClassifyRequest, ClassifyResult, Prediction, image_bytes
from service.engine.batching import DynamicBatcher
from service.engine.sessions import ModelLoadError, ModelSession
from service.kinds.base import MODEL_FILE, LoadContext
from service.kinds.tensor import TensorModel, tensor_model
from service.observability.statistics import RequestTimes


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
        shifted = logits - logits.max(axis=1, keepdims=True)
        probs = np.exp(shifted)
        probs /= probs.sum(axis=1, keepdims=True)
        k = min(top_k, probs.shape[1])
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        labels = self.labels
        return [
            [Prediction(labels[i], int(i), float(row[i])) for i in idx]
            for row, idx in zip(probs, order, strict=True)
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

    def load(self, manifest: Manifest, version_dir: Path, context: LoadContext) -> TensorModel:
        session = context.session(version_dir, MODEL_FILE)
        pipeline = ClassifierPipeline(manifest, session)
        context.warm_up(session.warmup, pipeline.warmup)
        model = tensor_model(context.model, manifest, session, context, context.stats)
        model.labels[manifest.output_name] = pipeline.labels
        settings = context.settings

        def classify(request: ClassifyRequest) -> ClassifyJob:
            return ClassifyJob(
                request, pipeline, model.batcher, settings.default_top_k, settings.max_image_pixels
            )

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
        default_top_k: int,
        max_pixels: int,
    ) -> None:
        self._images = request.images
        self._top_k = default_top_k if request.top_k is None else request.top_k
        self._pipeline = pipeline
        self._max_pixels = max_pixels
        self.batcher = batcher
        self.rows = len(request.images)
        self.prepare_work = Work(Codec.IMAGE, image_bytes(request.images))
        self._batch = np.empty(0)
        self._outputs: list[np.ndarray] = []

    def prepare(self) -> None:
        pipeline, limit = self._pipeline, self._max_pixels
        self._batch = np.stack(
            [pipeline.prepare(decode_image(image, i, limit)) for i, image in enumerate(self._images)]
        )

    async def run(self, deadline: float | None, times: RequestTimes) -> None:
        self._outputs = await self.batcher.submit(self._pipeline.feeds(self._batch), deadline, times)

    def finish(self) -> ClassifyResult:
        pipeline = self._pipeline
        return ClassifyResult(results=pipeline.rank(pipeline.logits(self._outputs), self._top_k))
