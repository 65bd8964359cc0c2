"""`inference.GRPCInferenceService`: KServe v2 / Open Inference Protocol, with Triton's extensions.

A translator: protobuf messages to the data plane's types and back, nothing more.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from service._proto.inference import grpc_predict_v2_pb2 as pb
from service._proto.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from service.codecs import tensors
from service.codecs.kserve import model_config, model_statistics
from service.dataplane import DataPlane
from service.dataplane.calls import CallInfo, CallObserver, Failure, new_request_id
from service.domain import InferRequest, InferResult, OutputRequest, TensorMetadata
from service.transports.grpc.registration import observe, timeout_of

STREAM_METHOD = "/inference.GRPCInferenceService/ModelStreamInfer"
#: Messages of one stream in flight at once.
STREAM_CONCURRENCY = 64


class KServeServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, plane: DataPlane) -> None:
        self._plane = plane

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self._plane.live())

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._plane.ready())

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self._plane.model_ready(request.name, request.version))

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        found = self._plane.server_metadata()
        return pb.ServerMetadataResponse(name=found.name, version=found.version, extensions=found.extensions)

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        found = self._plane.model_metadata(request.name, request.version)
        return pb.ModelMetadataResponse(
            name=found.name,
            versions=found.versions,
            platform=found.platform,
            inputs=[_tensor_metadata(t) for t in found.inputs],
            outputs=[_tensor_metadata(t) for t in found.outputs],
        )

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        return infer_response(await self._plane.infer(infer_request(request), timeout_of(context)))

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Up to STREAM_CONCURRENCY messages at a time, so a stream batches like many clients.

        Responses come as they complete, matched to requests by `id`; an error answers its own
        request in-band (error_message, with the request's id) and the stream goes on. Each
        message is observed (logged, counted) like a unary call.
        """
        answers: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        slots = asyncio.Semaphore(STREAM_CONCURRENCY)
        running: set[asyncio.Task[None]] = set()

        async def reply(request: pb.ModelInferRequest) -> pb.ModelStreamInferResponse:
            result = await self._plane.infer(infer_request(request), timeout_of(context))
            return pb.ModelStreamInferResponse(infer_response=infer_response(result))

        async def answer(request: pb.ModelInferRequest) -> None:
            call = CallInfo(request_id=new_request_id(request.id), method="ModelStreamInfer")
            try:
                with CallObserver(call, STREAM_METHOD) as observer:
                    outcome = await observe(observer, reply(request), context)
                if isinstance(outcome, Failure):
                    echo = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
                    outcome = pb.ModelStreamInferResponse(error_message=outcome.message, infer_response=echo)
                await answers.put(outcome)
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
        return pb.ModelConfigResponse(
            config=model_config(self._plane.model_config(request.name, request.version))
        )

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelStatisticsResponse:
        found = self._plane.model_statistics(request.name, request.version)
        return pb.ModelStatisticsResponse(model_stats=[model_statistics(s) for s in found])

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        rows = self._plane.repository_index(request.ready, request.repository_name)
        return pb.RepositoryIndexResponse(
            models=[
                pb.RepositoryIndexResponse.ModelIndex(
                    name=r.name, version=r.version, state=r.state, reason=r.reason
                )
                for r in rows
            ]
        )

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelLoadResponse:
        parameters = tensors.parameters(request.parameters)
        await self._plane.load(request.model_name, parameters, request.repository_name)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelUnloadResponse:
        parameters = tensors.parameters(request.parameters)
        await self._plane.unload(request.model_name, parameters, request.repository_name)
        return pb.RepositoryModelUnloadResponse()


def infer_request(request: pb.ModelInferRequest) -> InferRequest:
    return InferRequest(
        model=request.model_name,
        version=request.model_version,
        inputs=tensors.input_tensors(request),
        outputs=[OutputRequest(o.name, tensors.parameters(o.parameters)) for o in request.outputs],
        id=request.id,
        parameters=tensors.parameters(request.parameters),
    )


def infer_response(result: InferResult) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=result.model, model_version=result.version, id=result.id)
    outputs, contents = response.outputs, response.raw_output_contents
    for name, array in result.outputs:
        datatype, raw = tensors.encode_raw(array)
        outputs.add(name=name, datatype=datatype, shape=array.shape)  # built in place, not copied in
        contents.append(raw)
    return response


def _tensor_metadata(spec: TensorMetadata) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(name=spec.name, datatype=spec.datatype, shape=spec.shape)
