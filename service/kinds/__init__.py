"""Pre- and post-processing per model kind; they see arrays with a batch axis, nothing of gRPC."""

from __future__ import annotations

from service.contract.manifest import Manifest
from service.engine.sessions import ModelSession
from service.kinds.captioner.pipeline import CaptionerPipeline
from service.kinds.classifier import ClassifierPipeline
from service.kinds.generator import GeneratorPipeline

Pipeline = ClassifierPipeline | GeneratorPipeline | CaptionerPipeline


def build_pipeline(manifest: Manifest, session: ModelSession) -> Pipeline | None:
    """The task pipeline for a single-graph kind; None for `tensor` models (KServe v2 only).

    A captioner has two graphs: the repository builds its CaptionerPipeline itself.
    """
    if manifest.kind == "classifier":
        return ClassifierPipeline(manifest, session)
    if manifest.kind == "generator":
        return GeneratorPipeline(manifest, session)
    return None
