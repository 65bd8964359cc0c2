"""`inference.GRPCInferenceService`: KServe v2 / Open Inference Protocol, with Triton's extensions.

Every model is reachable with its real ONNX tensors (a classifier takes its uint8 image batch and
answers logits), through the same batcher as the task API.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import grpc
import numpy as np

from service import __version__
from service._proto.inference import grpc_predict_v2_pb2 as pb
from service._proto.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from service._proto.inference import model_config_pb2 as config_pb
from service.codecs import images as codecs
from service.codecs import tensors
from service.engine.sessions import CUDA, ModelSession, TensorSpec
from service.errors import ConvserveError, InvalidArgument, ModelNotFound, status_for
from service.kinds import CaptionerPipeline
from service.kinds.captioner.pipeline import KSERVE_INPUT, KSERVE_OUTPUT, caption, caption_options
from service.observability.statistics import Duration
from service.repository import CAPTIONER_PARTS, ModelRepository, ModelVersion, VersionState
from service.security.auth import check_model_name
from service.settings import Settings
from service.transports.calls import current_call, observe_message
from service.transports.grpc.common import deadline_of, request_times, resolve

SERVER_NAME = "convserve"
STREAM_METHOD = "/inference.GRPCInferenceService/ModelStreamInfer"
#: Requests of at most this many bytes are decoded on the event loop, larger ones in a thread.
INLINE_BYTES = 64 * 1024
#: Messages of one stream in flight at once.
STREAM_CONCURRENCY = 64
EXTENSIONS = ["model_repository", "model_configuration", "statistics"]
PLATFORM = "onnxruntime_onnx"
#: A captioner as a whole: encoded images in, captions out, with the beam search in the server.
CAPTIONER_PLATFORM = "convserve_captioner"
_INDEX_STATES = {
    VersionState.LOADING: "LOADING",
    VersionState.READY: "READY",
    VersionState.FAILED: "UNAVAILABLE",
    VersionState.UNLOADED: "UNAVAILABLE",
}


class KServeServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self,
        repository: ModelRepository,
        is_ready: Callable[[], bool],
        max_message_bytes: int,
        settings: Settings | None = None,
    ) -> None:
        self._repository = repository
        self._is_ready = is_ready
        self._max_elements = max_message_bytes  # every element costs at least a byte on the wire
        self._settings = settings or Settings()

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
        served = resolve(self._repository, request.name, request.version, inference=False)
        inputs, outputs, _batchable = _signature(served)
        owner = (served.parent or served).model
        entry = next(e for e in self._repository.entries() if e.name == owner)
        ready = [v.version for v in entry.newest_first() if v.state is VersionState.READY]
        return pb.ModelMetadataResponse(
            name=served.model,
            versions=ready,
            platform=_platform(served),
            inputs=[_metadata(t) for t in inputs],
            outputs=[_metadata(t) for t in outputs],
        )

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        return await self.infer(request, deadline_of(context))

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Up to STREAM_CONCURRENCY messages at a time, so a stream batches like many clients.

        Responses come as they complete, matched to requests by `id`; an error answers its own
        request in-band (error_message, with the request's id) and the stream goes on.
        """
        answers: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        slots = asyncio.Semaphore(STREAM_CONCURRENCY)
        running: set[asyncio.Task[None]] = set()

        async def answer(request: pb.ModelInferRequest) -> None:
            try:
                response = await observe_message(
                    STREAM_METHOD, request.id, lambda: self.infer(request, deadline_of(context))
                )
                await answers.put(pb.ModelStreamInferResponse(infer_response=response))
            except Exception as exc:
                _code, message = status_for(exc)
                echo = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
                await answers.put(pb.ModelStreamInferResponse(error_message=message, infer_response=echo))
            finally:
                slots.release()

        async def read() -> None:
            async for request in request_iterator:
                await slots.acquire()
                task = asyncio.create_task(answer(request))
                running.add(task)
                task.add_done_callback(running.discard)
            await asyncio.gather(*running)
            await answers.put(None)

        reader = asyncio.create_task(read())
        try:
            while (item := await answers.get()) is not None:
                yield item
        finally:
            for task in (reader, *running):
                task.cancel()

    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelConfigResponse:
        served = resolve(self._repository, request.name, request.version, inference=False)
        return pb.ModelConfigResponse(config=_model_config(served))

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelStatisticsResponse:
        entries = self._repository.entries()
        if request.name:
            entries = [e for e in entries if e.name == request.name]
            if not entries and request.name.rpartition(".")[2] in CAPTIONER_PARTS:
                with contextlib.suppress(ConvserveError):  # a captioner's graph, e.g. captioner.encoder
                    part = self._repository.get(request.name, request.version)
                    return pb.ModelStatisticsResponse(model_stats=[_model_statistics(part)])
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
        _check_control_request(request)
        await self._repository.load(request.model_name)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelUnloadResponse:
        _check_control_request(request)
        await self._repository.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    async def infer(self, request: pb.ModelInferRequest, deadline: float | None) -> pb.ModelInferResponse:
        """ModelInfer, for any transport; `deadline` on the event loop's clock."""
        served = resolve(self._repository, request.model_name, request.model_version)
        with served.in_use():
            return await self._infer_on(served, request, deadline)

    async def _infer_on(
        self, served: ModelVersion, request: pb.ModelInferRequest, deadline: float | None
    ) -> pb.ModelInferResponse:
        if isinstance(served.pipeline, CaptionerPipeline):
            return await self._caption_on(served, served.pipeline, request, deadline)
        session, batcher, stats = _session(served), served.batcher, served.stats
        assert batcher is not None and stats is not None, "a READY version has a batcher and statistics"
        wanted = _requested_outputs(request, session.output_names)
        times = request_times()
        with stats.input_stage(times):
            rows = check_headers(request, session.inputs, session.batchable)
            batcher.admit(rows)  # refuse before decoding what cannot be queued
            if request.ByteSize() <= INLINE_BYTES:  # raw data is wrapped, not copied: cheap on the loop
                feeds = tensors.decode_inputs(request, max_elements=self._max_elements)
            else:
                feeds = await asyncio.to_thread(
                    tensors.decode_inputs, request, max_elements=self._max_elements
                )
        current_call().images = rows
        with stats.pending.track_inprogress():
            outputs = await batcher.submit(feeds, deadline, times)
        with stats.output_stage(times):
            return _response(request, served, wanted, dict(zip(session.output_names, outputs, strict=True)))

    async def _caption_on(
        self,
        served: ModelVersion,
        pipeline: CaptionerPipeline,
        request: pb.ModelInferRequest,
        deadline: float | None,
    ) -> pb.ModelInferResponse:
        """`captioner` itself: encoded images (BYTES, N x 1) in, best captions (BYTES, N x 1) out."""
        batcher, stats = served.batcher, served.stats
        assert batcher is not None and stats is not None
        wanted = _requested_outputs(request, [KSERVE_OUTPUT.name])
        settings = self._settings
        options = caption_options(
            pipeline, None, None, None, False, settings.max_beam_size, settings.max_caption_length
        )
        times = request_times()
        with stats.input_stage(times):
            rows = check_headers(request, [KSERVE_INPUT], True)
            if rows == 0:
                raise InvalidArgument(f"input {KSERVE_INPUT.name!r} holds no images")
            batcher.admit(rows)
            feeds = tensors.decode_inputs(request, max_elements=self._max_elements)
            images = list(feeds[KSERVE_INPUT.name].ravel())
            batch = await asyncio.to_thread(_prepare_encoded, pipeline, images, settings.max_image_pixels)
        current_call().images = rows
        with stats.pending.track_inprogress():
            results = await caption(pipeline, batcher, batch, options, deadline, times)
        with stats.output_stage(times):
            texts = np.array([[pipeline.text(best[0]).encode()] for best in results], dtype=object)
            return _response(request, served, wanted, {KSERVE_OUTPUT.name: texts})


def _prepare_encoded(pipeline: CaptionerPipeline, images: list[bytes], max_pixels: int) -> np.ndarray:
    prepared = []
    for index, data in enumerate(images):
        try:
            prepared.append(pipeline.prepare(codecs.decode_encoded(bytes(data), max_pixels)))
        except InvalidArgument as exc:
            raise InvalidArgument(f"image {index}: {exc}") from None
    return np.stack(prepared)


def _signature(served: ModelVersion) -> tuple[list[TensorSpec], list[TensorSpec], bool]:
    """A model's KServe inputs, outputs and whether it has a batch axis."""
    if isinstance(served.pipeline, CaptionerPipeline):
        return [KSERVE_INPUT], [KSERVE_OUTPUT], True
    session = _session(served)
    return session.inputs, session.outputs, session.batchable


def _platform(served: ModelVersion) -> str:
    return CAPTIONER_PLATFORM if isinstance(served.pipeline, CaptionerPipeline) else PLATFORM


def _session(served: ModelVersion) -> ModelSession:
    assert served.session is not None, "a READY version has a session"
    return served.session


def _metadata(spec: TensorSpec) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(
        name=spec.name, datatype=tensors.datatype_from_onnx(spec.onnx_type), shape=spec.shape
    )


def check_headers(request: pb.ModelInferRequest, specs: list[TensorSpec], batchable: bool) -> int:
    """Names, datatypes and shapes against the graph, before any data is read; returns the rows."""
    expected = {spec.name: spec for spec in specs}
    given = [tensor.name for tensor in request.inputs]
    unknown = sorted(set(given) - set(expected))
    if unknown:
        raise InvalidArgument(f"unknown input(s) {unknown}; the model takes {sorted(expected)}")
    missing = sorted(set(expected) - set(given))
    if missing:
        raise InvalidArgument(f"missing input(s) {missing}; the model takes {sorted(expected)}")
    for tensor in request.inputs:
        spec = expected[tensor.name]
        want = tensors.datatype_from_onnx(spec.onnx_type)
        if tensor.datatype != want:
            raise InvalidArgument(f"input {tensor.name!r}: expected datatype {want}, got {tensor.datatype}")
        shape = list(tensor.shape)
        if len(shape) != len(spec.shape) or any(
            w not in (-1, g) for w, g in zip(spec.shape, shape, strict=True)
        ):
            raise InvalidArgument(
                f"input {tensor.name!r}: expected shape {list(spec.shape)} (-1: any), got {shape}"
            )
    if not batchable:
        return 1
    first = {tensor.shape[0] for tensor in request.inputs}
    if len(first) != 1:
        raise InvalidArgument("inputs must share their first (batch) dimension")
    return first.pop()


def _requested_outputs(request: pb.ModelInferRequest, names: list[str]) -> list[str]:
    wanted = [o.name for o in request.outputs] or names
    unknown = sorted(set(wanted) - set(names))
    if unknown:
        raise InvalidArgument(f"unknown output(s) {unknown}; the model answers {names}")
    return wanted


def _response(
    request: pb.ModelInferRequest, served: ModelVersion, wanted: list[str], outputs: dict[str, np.ndarray]
) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=served.model, model_version=served.version, id=request.id)
    for name in wanted:
        tensor, raw = tensors.encode_output(name, outputs[name])
        response.outputs.append(tensor)
        response.raw_output_contents.append(raw)
    return response


def _model_config(served: ModelVersion) -> config_pb.ModelConfig:
    """Triton's view of the model: what perf_analyzer and tritonclient read to build requests."""
    batcher = served.batcher
    assert batcher is not None
    inputs, outputs, _batchable = _signature(served)
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
    captioner = isinstance(served.pipeline, CaptionerPipeline)
    config = config_pb.ModelConfig(
        name=served.model,
        platform=_platform(served),
        backend="convserve" if captioner else "onnxruntime",
        max_batch_size=options.max_batch_size,
        input=[config_pb.ModelInput(name=s.name, data_type=dtype(s), dims=dims(s)) for s in inputs],
        output=[config_pb.ModelOutput(name=s.name, data_type=dtype(s), dims=dims(s)) for s in outputs],
        instance_group=[config_pb.ModelInstanceGroup(count=options.instances, kind=kind)],
        default_model_filename="" if captioner else served.model_file,
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


def _check_control_request(
    request: pb.RepositoryModelLoadRequest | pb.RepositoryModelUnloadRequest,
) -> None:
    """Load/unload name one plain model of the one repository, and override nothing."""
    check_model_name(request.model_name)
    if request.repository_name:
        raise InvalidArgument("repository_name is not supported: the server has one repository")
    _no_overrides(request.parameters)


def _no_overrides(parameters: object) -> None:
    """Loading takes the model's own files only: no config or file overrides from the network."""
    if parameters:  # Triton's "config" and "file:<path>" overrides among them: all refused
        names = sorted(str(name)[:64] for name in parameters)[:8]  # never echo their values
        raise InvalidArgument(f"repository parameters are not supported (got {names})")
