"""Classifier pipeline: images -> the model's input distribution -> logits -> ranked predictions."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from service.contract import preprocessing as imaging
from service.contract.manifest import DigitAdaptation, Manifest
from service.engine.sessions import ModelLoadError, ModelSession


@dataclass(frozen=True)
class Prediction:
    label: str
    index: int
    score: float


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

    @property
    def feeds_check(self) -> None:
        """Nothing to check beyond dtype and shape: every uint8 image is a valid input."""
        return None

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
