"""What a model kind is to the server: the protocols every kind implements and what loading gets.

A kind (`ModelKind`) turns a version folder and its manifest section into a `LoadedModel`. The
loaded model describes its tensors (`Signature`, for KServe metadata and ModelConfig), names the
tasks it answers (`tasks`: a request type -> a function that plans a `Job` for one request) and
may have parts of its own served as tensor models (the captioner's encoder and decoder).

The data plane runs every job the same way: admit `rows` on `batcher`, `prepare()` (inline or in
a thread, by `prepare_work`), `await run()`, `finish()` (by `finish_work`). So the request path is
written once and a kind only says what its steps are.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, Protocol

from service.codecs.cost import Work
from service.contract.manifest import Manifest
from service.engine.batching import BatchingOptions, CheckFunction, DynamicBatcher
from service.engine.sessions import ModelLoadError, ModelSession, SessionOptions, TensorSpec, one_line_reason
from service.errors import InvalidArgument, clip
from service.observability.statistics import RequestTimes, VersionStatistics
from service.settings import Settings

#: The file of a single-graph model in its version folder.
MODEL_FILE = "model.onnx"
#: How an ONNX graph served as it is calls itself in KServe metadata and Triton's ModelConfig.
ONNX_PLATFORM = "onnxruntime_onnx"
ONNX_BACKEND = "onnxruntime"


@dataclass(frozen=True)
class Signature:
    """A served model's tensors and how KServe v2 and Triton's ModelConfig name it."""

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    batchable: bool
    platform: str = ONNX_PLATFORM
    backend: str = ONNX_BACKEND
    model_file: str = MODEL_FILE  # "" when no single file is the model

    @classmethod
    def of_session(cls, session: ModelSession, model_file: str = MODEL_FILE) -> Signature:
        return cls(session.inputs, session.outputs, session.batchable, model_file=model_file)


class Job(Protocol):
    """One request's work, planned by a kind's task after it checked the request."""

    rows: int  # what the request asks of the batcher's queue (images, latents, tensor rows)
    batcher: DynamicBatcher
    prepare_work: Work
    finish_work: Work

    def prepare(self) -> None:
        """Turn the request into model inputs (decode, pre-process); may run in a thread."""

    async def run(self, deadline: float | None, times: RequestTimes) -> None:
        """Run the model (through the batcher); `times` gets queue and infer seconds."""

    def finish(self) -> Any:
        """The domain result from the model's outputs; may run in a thread."""


#: A task: one request of its type -> the job that answers it (raises InvalidArgument for a bad one).
Task = Callable[[Any], Job]


class LoadedModel(Protocol):
    """One loaded version of a model (or one of its parts), ready to answer."""

    name: str  # as clients call it: "lenet5", "captioner.encoder"
    provider: str  # the execution provider onnxruntime chose
    stats: VersionStatistics
    signature: Signature
    batching: BatchingOptions  # of the batcher its KServe requests go through
    tasks: Mapping[type, Task]  # request type -> task
    parts: Mapping[str, LoadedModel]  # served as `<name>.<part>`

    async def close(self) -> None:
        """Stop its batchers and loops; queued requests fail as unloaded."""


@dataclass(frozen=True)
class TaskName:
    """How errors speak of a kind's own task, so the data plane need not know the kind."""

    noun: str  # what a model must be to answer it: "model 'dcgan' is a generator, not a classifier"
    example: str = ""  # a model to suggest when a request names none ("": the model is not required here)


class ModelKind(Protocol):
    """A kind of model: loads a version from its folder and its manifest section."""

    name: str  # the manifest's `kind`
    answers: ClassVar[Mapping[type, TaskName]]  # the request types of its own tasks

    def load(self, manifest: Manifest, version_dir: Path, context: LoadContext) -> LoadedModel:
        """Blocking (sessions, warm-up): the repository calls it in a thread."""


@dataclass(frozen=True)
class LoadContext:
    """What the repository gives a kind to load one version with."""

    model: str
    version: str
    stats: VersionStatistics  # the version's own statistics
    sessions: SessionOptions
    batching: BatchingOptions  # the server's defaults
    settings: Settings  # request limits, and any kind's own server-wide settings
    warmup: bool = True

    def session(self, version_dir: Path, file: str) -> ModelSession:
        path = version_dir / file
        if not path.is_file():
            raise ModelLoadError(f"{file} is missing in version folder {version_dir.name}")
        return ModelSession(path, self.sessions)

    def statistics(self, name: str) -> VersionStatistics:
        """Statistics of a part of the version, served as a model of its own."""
        return VersionStatistics(name, self.version)

    def batcher(
        self,
        manifest: Manifest,
        session: ModelSession,
        stats: VersionStatistics,
        check: CheckFunction | None = None,
    ) -> DynamicBatcher:
        """Server defaults, overridden by the model's config; no batch axis means no merging.

        `check`: the kind's checks of one request's arrays, run before it joins a batch.
        """
        chosen, defaults = manifest.batching, self.batching
        options = BatchingOptions(
            max_batch_size=defaults.max_batch_size
            if chosen.max_batch_size is None
            else chosen.max_batch_size,
            max_queue_delay=defaults.max_queue_delay
            if chosen.max_queue_delay is None
            else chosen.max_queue_delay,
            max_queue_size=chosen.max_queue_size or defaults.max_queue_size,
            instances=chosen.instances or defaults.instances,
            inline=defaults.inline,
        )
        if not session.batchable:
            options = replace(options, max_batch_size=0, max_queue_delay=0.0)
        return DynamicBatcher(
            session.run,
            options,
            on_run=lambda report: stats.ran(report.rows, report.seconds),
            on_dequeue=lambda report: stats.queued(report.seconds),
            check=check,
            on_isolation=lambda report: stats.isolated(report.retries, report.alone, report.with_batch),
        )

    def warm_up(self, *steps: Callable[[], object]) -> None:
        """Run the warm-up steps (when warm-up is on); a graph that cannot run them fails its version
        (FAILED, with the reason), like a graph that cannot load; it must not stop the server."""
        if not self.warmup:
            return
        try:
            for step in steps:
                step()
        except ModelLoadError:
            raise
        except Exception as exc:  # onnxruntime's own types, or a domain error from the session
            raise ModelLoadError(f"the warm-up run failed: {one_line_reason(exc)}") from exc


def not_offered(model: str, kind: str, noun: str) -> InvalidArgument:
    """The error for a task a model's kind does not answer, e.g. Caption on a classifier."""
    hint = "; call it through KServe v2 (ModelInfer)" if kind == "tensor" else ""
    return InvalidArgument(f"model {clip(model)} is a {kind}, not a {noun}{hint}")
