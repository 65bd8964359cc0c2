"""`inference.GRPCInferenceService`: KServe v2 / Open Inference Protocol, with Triton's extensions.

Every model is reachable with its real ONNX tensors (a classifier takes its uint8 image batch and
answers logits), through the same batcher as the task API.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import grpc
import numpy as np

from service import __version__, tensors
from service._proto.inference import grpc_predict_v2_pb2 as pb
from service._proto.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from service._proto.inference import model_config_pb2 as config_pb
from service.errors import ConvserveError, InvalidArgument, ModelNotFound, status_for
from service.interceptors import current_call, observe_message
from service.repository import ModelRepository, ModelVersion, VersionState
from service.runtime import CUDA, ModelSession, TensorSpec
from service.servicers.common import deadline_of, resolve
from service.statistics import Duration

SERVER_NAME = "convserve"
EXTENSIONS = ["model_repository", "model_configuration", "statistics"]
PLATFORM = "onnxruntime_onnx"
_INDEX_STATES = {
    VersionState.LOADING: "LOADING",
    VersionState.READY: "READY",
    VersionState.FAILED: "UNAVAILABLE",
    VersionState.UNLOADED: "UNAVAILABLE",
}


class KServeServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, repository: ModelRepository, is_ready: Callable[[], bool]) -> None:
        self._repository = repository
        self._is_ready = is_ready

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._is_ready())

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        try:
            self._repository.get(request.name, request.version)
        except ConvserveError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=__version__, extensions=EXTENSIONS)

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        served = resolve(self._repository, request.name, request.version)
        session = _session(served)
        entry = next(e for e in self._repository.entries() if e.name == served.model)
        ready = [v.version for v in entry.newest_first() if v.state is VersionState.READY]
        return pb.ModelMetadataResponse(
            name=served.model,
            versions=ready,
            platform=PLATFORM,
            inputs=[_metadata(t) for t in session.inputs],
            outputs=[_metadata(t) for t in session.outputs],
        )

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        return await self._infer(request, deadline_of(context))

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Answers in request order; an error answers that request only and the stream goes on."""
        method = "/inference.GRPCInferenceService/ModelStreamInfer"
        async for request in request_iterator:
            try:
                response = await observe_message(
                    method, request.id, lambda request=request: self._infer(request, deadline_of(context))
                )
            except Exception as exc:  # reported in-band, as the protocol says; the stream stays open
                _code, message = status_for(exc)
                yield pb.ModelStreamInferResponse(error_message=message)
            else:
                yield pb.ModelStreamInferResponse(infer_response=response)

    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelConfigResponse:
        served = resolve(self._repository, request.name, request.version)
        return pb.ModelConfigResponse(config=_model_config(served))

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelStatisticsResponse:
        entries = self._repository.entries()
        if request.name:
            entries = [e for e in entries if e.name == request.name]
            if not entries:
                current_call().model = "unknown"
                raise ModelNotFound(f"model {request.name!r} not found")
        stats = [
            _model_statistics(v)
            for e in entries
            for v in e.newest_first()
            if v.stats is not None and (not request.version or v.version == request.version)
        ]
        return pb.ModelStatisticsResponse(model_stats=stats)

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        models = []
        for entry in self._repository.entries():
            versions = entry.newest_first()
            if not versions:
                state = "UNAVAILABLE" if entry.error else ""
                models.append(
                    pb.RepositoryIndexResponse.ModelIndex(name=entry.name, state=state, reason=entry.error)
                )
            for v in versions:
                models.append(
                    pb.RepositoryIndexResponse.ModelIndex(
                        name=entry.name, version=v.version, state=_INDEX_STATES[v.state], reason=v.reason
                    )
                )
        if request.ready:
            models = [m for m in models if m.state == "READY"]
        return pb.RepositoryIndexResponse(models=models)

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelLoadResponse:
        _no_overrides(request.parameters)
        await self._repository.load(request.model_name)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelUnloadResponse:
        _no_overrides(request.parameters)
        await self._repository.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    async def _infer(self, request: pb.ModelInferRequest, deadline: float | None) -> pb.ModelInferResponse:
        served = resolve(self._repository, request.model_name, request.model_version)
        with served.in_use():
            return await self._infer_on(served, request, deadline)

    async def _infer_on(
        self, served: ModelVersion, request: pb.ModelInferRequest, deadline: float | None
    ) -> pb.ModelInferResponse:
        session, batcher, stats = _session(served), served.batcher, served.stats
        assert batcher is not None and stats is not None, "a READY version has a batcher and statistics"
        with stats.input_stage():
            feeds = _check_inputs(tensors.decode_inputs(request), session.inputs)
        current_call().images = next(iter(feeds.values())).shape[0] if session.batchable else 1
        with stats.pending.track_inprogress():
            outputs = await batcher.submit(feeds, deadline)
        with stats.output_stage():
            return _response(request, served, session.output_names, outputs)


def _session(served: ModelVersion) -> ModelSession:
    assert served.session is not None, "a READY version has a session"
    return served.session


def _metadata(spec: TensorSpec) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(
        name=spec.name, datatype=tensors.datatype_from_onnx(spec.onnx_type), shape=spec.shape
    )


def _check_inputs(arrays: dict[str, np.ndarray], specs: list[TensorSpec]) -> dict[str, np.ndarray]:
    """The request's arrays against the graph's inputs: names, datatypes and shapes."""
    expected = {spec.name: spec for spec in specs}
    unknown = sorted(set(arrays) - set(expected))
    if unknown:
        raise InvalidArgument(f"unknown input(s) {unknown}; the model takes {sorted(expected)}")
    missing = sorted(set(expected) - set(arrays))
    if missing:
        raise InvalidArgument(f"missing input(s) {missing}; the model takes {sorted(expected)}")
    for name, array in arrays.items():
        spec = expected[name]
        want = tensors.datatype_from_onnx(spec.onnx_type)
        got = tensors.datatype_of(array.dtype)
        if got != want:
            raise InvalidArgument(f"input {name!r}: expected datatype {want}, got {got}")
        if len(array.shape) != len(spec.shape) or any(
            w not in (-1, g) for w, g in zip(spec.shape, array.shape, strict=True)
        ):
            raise InvalidArgument(
                f"input {name!r}: expected shape {list(spec.shape)} (-1: any), got {list(array.shape)}"
            )
    if len({a.shape[0] for a in arrays.values() if a.ndim}) > 1:
        raise InvalidArgument("inputs must share their first (batch) dimension")
    return arrays


def _response(
    request: pb.ModelInferRequest, served: ModelVersion, names: list[str], outputs: list[np.ndarray]
) -> pb.ModelInferResponse:
    wanted = [o.name for o in request.outputs] or names
    unknown = sorted(set(wanted) - set(names))
    if unknown:
        raise InvalidArgument(f"unknown output(s) {unknown}; the model answers {names}")
    response = pb.ModelInferResponse(model_name=served.model, model_version=served.version, id=request.id)
    for name in wanted:
        tensor, raw = tensors.encode_output(name, outputs[names.index(name)])
        response.outputs.append(tensor)
        response.raw_output_contents.append(raw)
    return response


def _model_config(served: ModelVersion) -> config_pb.ModelConfig:
    """Triton's view of the model: what perf_analyzer and tritonclient read to build requests."""
    session, batcher = _session(served), served.batcher
    assert batcher is not None
    options = batcher.options
    batched = options.max_batch_size > 0

    def dims(spec: TensorSpec) -> list[int]:
        return list(spec.shape[1:] if batched else spec.shape)

    def dtype(spec: TensorSpec) -> int:
        return tensors.config_datatype(tensors.datatype_from_onnx(spec.onnx_type))

    kind = (
        config_pb.ModelInstanceGroup.KIND_GPU
        if served.provider == CUDA
        else config_pb.ModelInstanceGroup.KIND_CPU
    )
    config = config_pb.ModelConfig(
        name=served.model,
        platform=PLATFORM,
        backend="onnxruntime",
        max_batch_size=options.max_batch_size,
        input=[config_pb.ModelInput(name=s.name, data_type=dtype(s), dims=dims(s)) for s in session.inputs],
        output=[
            config_pb.ModelOutput(name=s.name, data_type=dtype(s), dims=dims(s)) for s in session.outputs
        ],
        instance_group=[config_pb.ModelInstanceGroup(count=options.instances, kind=kind)],
        default_model_filename="model.onnx",
    )
    if batched:
        config.dynamic_batching.max_queue_delay_microseconds = int(options.max_queue_delay * 1e6)
        config.dynamic_batching.default_queue_policy.max_queue_size = options.max_queue_size
    return config


def _model_statistics(version: ModelVersion) -> pb.ModelStatistics:
    stats = version.stats
    assert stats is not None

    def duration(d: Duration) -> pb.StatisticDuration:
        return pb.StatisticDuration(count=d.count, ns=d.ns)

    return pb.ModelStatistics(
        name=version.model,
        version=version.version,
        last_inference=stats.last_inference_ms,
        inference_count=stats.inference_count,
        execution_count=stats.execution_count,
        inference_stats=pb.InferStatistics(
            success=duration(stats.success),
            fail=duration(stats.fail),
            queue=duration(stats.queue),
            compute_input=duration(stats.compute_input),
            compute_infer=duration(stats.compute_infer),
            compute_output=duration(stats.compute_output),
        ),
        batch_stats=[
            pb.InferBatchStatistics(batch_size=size, compute_infer=duration(b.compute_infer))
            for size, b in sorted(stats.batches.items())
        ],
    )


def _no_overrides(parameters: object) -> None:
    """Loading takes the model's own files only: no config or file overrides from the network."""
    if parameters:
        raise InvalidArgument(f"repository parameters are not supported (got {sorted(parameters)})")
