"""The one transport-neutral request path, from domain request to domain result.

Every inference call goes the same way: resolve the model and version → the model's kind plans
a job for the request (checking it) → admit its rows on the batcher's queue → prepare its inputs
(on the event loop or in a thread, by the codec's cost rule) → run it → build the result. Timing
and statistics are taken here once; the call observation (calls.py) counts and logs the call.
Transports (service/transports/) only translate wire messages to these types and back.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import Any, TypeVar

from service import __version__
from service.codecs.cost import Work
from service.codecs.tensors import datatype_from_onnx
from service.dataplane.calls import current_call
from service.dataplane.parameters import (
    check_infer_parameters,
    check_load_parameters,
    check_unload_parameters,
)
from service.domain import (
    CaptionRequest,
    CaptionResult,
    ClassifyRequest,
    ClassifyResult,
    Duration,
    GenerateRequest,
    GenerateResult,
    IndexEntry,
    InferRequest,
    InferResult,
    InputSpec,
    LatentRequest,
    LatentResult,
    ModelConfig,
    ModelInfo,
    ModelMetadata,
    ModelStatistics,
    Parameters,
    RecentStatistics,
    ServerMetadata,
    TensorMetadata,
    VersionInfo,
)
from service.engine.decoding import DecodePool
from service.engine.sessions import CUDA, TensorSpec
from service.errors import ConvserveError, InvalidArgument, ModelNotFound, clip
from service.kinds import TASK_NAMES
from service.kinds.base import Task, not_offered
from service.observability.metrics import UNKNOWN_MODEL
from service.observability.statistics import Duration as StatsDuration
from service.observability.statistics import RequestTimes, VersionStatistics
from service.repository import ModelEntry, ModelRepository, ModelVersion, Served, VersionState
from service.security.auth import check_model_name
from service.settings import Settings

SERVER_NAME = "convserve"
#: The KServe v2 / Triton extensions this server implements, exactly.
EXTENSIONS = [
    "binary_tensor_data",
    "classification",
    "model_configuration",
    "model_repository",
    "model_repository(unload_dependents)",
    "statistics",
]
_INDEX_STATES = {
    VersionState.LOADING: "LOADING",
    VersionState.READY: "READY",
    VersionState.FAILED: "UNAVAILABLE",
    VersionState.UNLOADED: "UNAVAILABLE",
}

R = TypeVar("R")


class DataPlane:
    """What the server answers, whatever the transport; `timeout` arguments are seconds (None: the
    server's default, `default_timeout_seconds`)."""

    def __init__(self, repository: ModelRepository, settings: Settings, is_ready: Callable[[], bool]) -> None:
        self._repository = repository
        self._settings = settings
        self._is_ready = is_ready
        self._pool = DecodePool(settings.decode_threads, settings.decode_queue, settings.decode_processes)

    def close(self) -> None:
        """Stop the decode pool's threads (work still waiting never starts)."""
        self._pool.close()

    # Health and server metadata ------------------------------------------------------------------

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        return self._is_ready()

    def model_ready(self, name: str, version: str = "", *, unknown_is_error: bool = False) -> bool:
        """Whether the model (version) can answer now. An unknown one is not ready, or, with
        `unknown_is_error`, ModelNotFound (HTTP answers 404 where gRPC answers ready=false)."""
        try:
            served = self._repository.get(name, version)
        except ModelNotFound:
            if unknown_is_error:
                current_call().model = UNKNOWN_MODEL
                raise
            return False
        except ConvserveError:
            return False
        call = current_call()
        call.model, call.version = served.name, served.version.version
        return True

    def server_metadata(self) -> ServerMetadata:
        return ServerMetadata(SERVER_NAME, __version__, list(EXTENSIONS))

    # Inference -----------------------------------------------------------------------------------

    # The kind that answers checks the request's fields (its task builds the job); here only what
    # every request has: a model name where the task needs one, and the deadline.

    async def classify(self, request: ClassifyRequest, timeout: float | None = None) -> ClassifyResult:
        return await self._answer(request, timeout)

    async def generate(self, request: GenerateRequest, timeout: float | None = None) -> GenerateResult:
        return await self._answer(request, timeout)

    def latents(self, request: LatentRequest) -> LatentResult:
        """The latent vectors Generate would draw for a seed; no model runs, so the call is not
        counted in the model's statistics."""
        _require_model(request)
        served = self._resolve(request.model, request.version, inference=False)
        result: LatentResult = _task(served, request)(request).finish()
        result.model, result.version = served.name, served.version.version
        return result

    async def caption(self, request: CaptionRequest, timeout: float | None = None) -> CaptionResult:
        return await self._answer(request, timeout)

    async def infer(self, request: InferRequest, timeout: float | None = None) -> InferResult:
        """KServe v2 ModelInfer; the request's own `timeout` parameter (µs, as Triton's) also applies."""
        microseconds = check_infer_parameters(request)
        if microseconds is not None:
            timeout = microseconds / 1e6 if timeout is None else min(timeout, microseconds / 1e6)
        return await self._answer(request, timeout)

    async def _answer(self, request: Any, timeout: float | None) -> Any:
        """The request path, once for every task and transport."""
        _require_model(request)
        deadline = self._deadline(timeout)
        served = self._resolve(request.model, request.version)
        task = _task(served, request)
        call = current_call()
        stats, times = served.model.stats, call.times or RequestTimes()
        with served.version.in_use():
            with stats.input_stage(times):
                job = task(request)
                job.batcher.admit(job.rows)  # refuse before decoding what cannot be queued
                call.images = job.rows
                await self.offload(job.prepare_work, job.prepare, deadline)
            stats.pending.inc()
            try:
                await job.run(deadline, times)
            finally:
                stats.pending.dec()
            with stats.output_stage(times):
                result = await self.offload(job.finish_work, job.finish, deadline)
        result.model, result.version = served.name, served.version.version
        return result

    async def offload(self, work: Work, step: Callable[[], R], deadline: float | None = None) -> R:
        """Run a step where its cost says: on the event loop, or in the bounded decode pool (full:
        QueueFull), where it stops between images once `deadline` (the loop's clock) passed or the
        call was cancelled. Transports use it too, for wire decoding that costs (large JSON)."""
        if work.inline:
            return step()
        return await self._pool.run(work, step, deadline)

    def _resolve(self, name: str, version: str, inference: bool = True) -> Served:
        """What answers; the call is labelled with it (or "unknown", never the client's string).

        Inference calls also count in the model's statistics (success, failure, latency), with the
        stage times they gather in `call.times`.
        """
        call = current_call()
        try:
            served = self._repository.get(name, version)
        except ModelNotFound:
            call.model = UNKNOWN_MODEL
            raise
        call.model, call.version = served.name, served.version.version
        if inference:
            call.stats = served.model.stats
            call.times = RequestTimes()
        return served

    def _deadline(self, timeout: float | None) -> float | None:
        """A timeout in seconds as a deadline on the event loop's clock."""
        if timeout is None:
            timeout = self._settings.default_timeout_seconds or None
        if timeout is None:
            return None
        if not 0 <= timeout < math.inf:
            raise InvalidArgument(f"timeout must be a number of seconds >= 0, got {timeout}")
        return asyncio.get_running_loop().time() + timeout

    # Model metadata, configuration and statistics ------------------------------------------------

    def model_metadata(self, name: str, version: str = "") -> ModelMetadata:
        served = self._resolve(name, version, inference=False)
        signature = served.model.signature
        return ModelMetadata(
            name=served.name,
            versions=self._ready_versions(served.version.model),
            platform=signature.platform,
            inputs=[_metadata(t) for t in signature.inputs],
            outputs=[_metadata(t) for t in signature.outputs],
        )

    def model_config(self, name: str, version: str = "") -> ModelConfig:
        """Triton's view of the model: what perf_analyzer and tritonclient read to build requests."""
        served = self._resolve(name, version, inference=False)
        model = served.model
        signature, options = model.signature, model.batching
        batched = options.max_batch_size > 0
        return ModelConfig(
            name=served.name,
            platform=signature.platform,
            backend=signature.backend,
            max_batch_size=options.max_batch_size,
            inputs=[_metadata(t, batched) for t in signature.inputs],
            outputs=[_metadata(t, batched) for t in signature.outputs],
            instances=options.instances,
            on_gpu=model.provider == CUDA,
            default_model_filename=signature.model_file,
            max_queue_delay_microseconds=int(options.max_queue_delay * 1e6) if batched else 0,
            max_queue_size=options.max_queue_size if batched else 0,
        )

    def model_statistics(self, name: str = "", version: str = "") -> list[ModelStatistics]:
        """Every version's statistics (of one model when named); a model's part by its own name."""
        entries = self._repository.entries()
        if name:
            entries = [e for e in entries if e.name == name]
            if not entries:
                served = self._part(name, version)
                return [_statistics(served.name, served.version.version, served.model.stats)]
        return [
            _statistics(v.model, v.version, v.stats)
            for e in entries
            for v in e.newest_first()
            if v.stats is not None and (not version or v.version == version)
        ]

    def recent_statistics(self) -> list[RecentStatistics]:
        """Every loaded version's requests over the last minute (whole seconds): the live figures."""
        rows = []
        for entry in self._repository.entries():
            for v in entry.newest_first():
                if v.stats is None:
                    continue
                window = v.stats.recent.summary()
                rows.append(
                    RecentStatistics(
                        name=v.model,
                        version=v.version,
                        window_seconds=window.seconds,
                        requests=window.requests,
                        failures=window.failures,
                        p50=window.p50,
                        p99=window.p99,
                        per_second=window.per_second,
                    )
                )
        return rows

    def _part(self, name: str, version: str) -> Served:
        """A model's part (e.g. `captioner.encoder`) by its name; NOT_FOUND for anything else."""
        try:
            served = self._repository.get(name, version)
        except ConvserveError:
            served = None
        if served is None or served.name == served.version.model:
            current_call().model = UNKNOWN_MODEL
            raise ModelNotFound(f"model {clip(name)} not found")
        return served

    def _ready_versions(self, model: str) -> list[str]:
        entry = next(e for e in self._repository.entries() if e.name == model)
        return [v.version for v in entry.newest_first() if v.state is VersionState.READY]

    # The repository ------------------------------------------------------------------------------

    def repository_index(self, ready_only: bool = False, repository: str = "") -> list[IndexEntry]:
        _check_repository(repository)
        rows = []
        for entry in self._repository.entries():
            versions = entry.newest_first()
            if not versions:
                rows.append(IndexEntry(entry.name, "", "UNAVAILABLE" if entry.error else "", entry.error))
            rows += [IndexEntry(entry.name, v.version, _INDEX_STATES[v.state], v.reason) for v in versions]
        return [r for r in rows if r.state == "READY"] if ready_only else rows

    async def load(self, name: str, parameters: Parameters, repository: str = "") -> None:
        """Load (or reload) a model by request."""
        _check_control(name, repository)
        check_load_parameters(parameters)
        await self._repository.load(name)

    async def unload(self, name: str, parameters: Parameters, repository: str = "") -> None:
        """Unload every version of a model by request (its parts go with it)."""
        _check_control(name, repository)
        check_unload_parameters(parameters)
        await self._repository.unload(name)

    def models(self) -> list[ModelInfo]:
        """Every model and its versions, as the task API's ListModels answers."""
        return [_model_info(entry) for entry in self._repository.entries()]


def _require_model(request: Any) -> None:
    """A task request names its model (the kind that answers its type suggests one)."""
    named = TASK_NAMES.get(type(request))
    if not request.model and named is not None and named.example:
        raise InvalidArgument(f"model is required, e.g. {named.example!r}")


def _task(served: Served, request: Any) -> Task:
    """The model's task for the request's type; a model of another kind is refused by name."""
    task = served.model.tasks.get(type(request))
    if task is None:
        kind = served.version.manifest.kind if served.version.manifest is not None else "model"
        named = TASK_NAMES.get(type(request))
        raise not_offered(served.name, kind, named.noun if named else type(request).__name__)
    return task


def _check_control(name: str, repository: str) -> None:
    """Load/unload name one plain model of the one repository."""
    check_model_name(name)
    _check_repository(repository)


def _check_repository(repository: str) -> None:
    """A repository call names no repository (or the one there is: none by name)."""
    if repository:
        raise InvalidArgument("repository_name is not supported: the server has one repository")


def _metadata(spec: TensorSpec, batched: bool = False) -> TensorMetadata:
    shape = list(spec.shape[1:] if batched else spec.shape)
    return TensorMetadata(spec.name, datatype_from_onnx(spec.onnx_type), shape)


def _statistics(name: str, version: str, stats: VersionStatistics) -> ModelStatistics:
    def duration(d: StatsDuration) -> Duration:
        return Duration(d.count, d.ns)

    return ModelStatistics(
        name=name,
        version=version,
        last_inference=stats.last_inference_ms,
        inference_count=stats.inference_count,
        execution_count=stats.execution_count,
        success=duration(stats.success),
        fail=duration(stats.fail),
        queue=duration(stats.queue),
        compute_input=duration(stats.compute_input),
        compute_infer=duration(stats.compute_infer),
        compute_output=duration(stats.compute_output),
        batches=[(size, duration(b.compute_infer)) for size, b in sorted(stats.batches.items())],
    )


def _model_info(entry: ModelEntry) -> ModelInfo:
    versions = [_version_info(v) for v in entry.newest_first()]
    manifest = entry.manifest
    if manifest is None:
        versions = versions or [VersionInfo("", VersionState.FAILED.value, entry.error, "")]
        return ModelInfo(entry.name, "", versions, None, [])
    spec = manifest.input
    shown = (
        None
        if spec is None
        else InputSpec(spec.name, spec.height, spec.width, spec.channels, spec.color_mode)
    )
    return ModelInfo(entry.name, manifest.kind, versions, shown, list(manifest.labels or []))


def _version_info(version: ModelVersion) -> VersionInfo:
    return VersionInfo(version.version, version.state.value, version.reason, version.provider)
