"""A do-nothing KServe v2 gRPC server: the transport limit the bench suite measures us against.

It is built from the same pieces as `convserve serve` (grpc.aio, the generated KServe v2 stubs,
the same channel arguments and gRPC thread priority, header checks, raw-tensor decoding and
encoding) but runs no model:
ModelInfer checks the request against the model's signature and answers zeros of the output shapes. Its
throughput is what one core can do with gRPC and our protocol code alone, so a real server's
throughput over it shows the cost of everything else (batching, onnxruntime, bookkeeping).

The signatures come from the repository's ONNX files (onnxruntime reads them; nothing is run).

    python -m bench.noop_server --model-repository models --model lenet5 --port 8101
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from service._proto.inference import grpc_predict_v2_pb2 as pb
from service._proto.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from service.codecs import tensors
from service.engine.sessions import CPU, ModelSession, SessionOptions, TensorSpec
from service.errors import ConvserveError, ModelNotFound, status_for
from service.kinds.tensor import check_headers
from service.server import new_grpc_server
from service.settings import Settings

log = logging.getLogger(__name__)


class Signature:
    """A model's inputs and outputs, and the zero answers already encoded per batch size."""

    def __init__(self, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> None:
        self.inputs = {spec.name: spec for spec in inputs}
        self.outputs = outputs
        self._answers: dict[int, list[tuple[pb.ModelInferResponse.InferOutputTensor, bytes]]] = {}

    def answer(self, rows: int) -> list[tuple[pb.ModelInferResponse.InferOutputTensor, bytes]]:
        """Zeros of every output for `rows` rows, encoded once per row count."""
        if rows not in self._answers:
            self._answers[rows] = [
                tensors.encode_output(spec.name, np.zeros((rows, *spec.shape[1:]), dtype=spec.dtype))
                for spec in self.outputs
            ]
        return self._answers[rows]


def read_signature(repository: Path, model: str) -> tuple[str, Signature]:
    """The newest version's signature (its directory name is the version)."""
    versions = sorted(
        (p for p in (repository / model).glob("*/model.onnx") if p.parent.name.isdigit()),
        key=lambda p: int(p.parent.name),
    )
    if not versions:
        raise SystemExit(f"no {repository / model}/<version>/model.onnx")
    session = ModelSession(versions[-1], SessionOptions(providers=(CPU,)))
    return versions[-1].parent.name, Signature(list(session.inputs), list(session.outputs))


class NoopServicer(pb_grpc.GRPCInferenceServiceServicer):
    """ServerLive/Ready, ModelReady, ModelMetadata and ModelInfer; nothing else is needed to bench."""

    def __init__(self, models: dict[str, tuple[str, Signature]], max_elements: int) -> None:
        self._models = models
        self._max_elements = max_elements

    def _model(self, name: str) -> tuple[str, Signature]:
        if name not in self._models:
            raise ModelNotFound(f"model {name!r} not found")
        return self._models[name]

    async def ServerLive(self, request: pb.ServerLiveRequest, context: object) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: object) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=True)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: object) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=request.name in self._models)

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        try:
            version, signature = self._model(request.name)
        except ConvserveError as exc:
            await _abort(context, exc)
        return pb.ModelMetadataResponse(
            name=request.name,
            versions=[version],
            platform="noop",
            inputs=[_metadata(spec) for spec in signature.inputs.values()],
            outputs=[_metadata(spec) for spec in signature.outputs],
        )

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        try:
            version, signature = self._model(request.model_name)
            inputs = tensors.input_tensors(request)
            rows = check_headers(inputs, list(signature.inputs.values()), batchable=True)
            tensors.decode_tensors(inputs, max_elements=self._max_elements)  # as the real server does
        except ConvserveError as exc:
            await _abort(context, exc)
        response = pb.ModelInferResponse(model_name=request.model_name, model_version=version, id=request.id)
        for tensor, raw in signature.answer(rows):
            response.outputs.append(tensor)
            response.raw_output_contents.append(raw)
        return response


def _metadata(spec: TensorSpec) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(
        name=spec.name, datatype=tensors.datatype_from_onnx(spec.onnx_type), shape=spec.shape
    )


async def _abort(context: grpc.aio.ServicerContext, exc: ConvserveError) -> None:
    code, message = status_for(exc)
    await context.abort(code, message)


async def serve(repository: Path, models: list[str], host: str, port: int) -> None:
    """Serve until SIGTERM or SIGINT; the health service says SERVING once the port is bound."""
    settings = Settings()
    signatures = {model: read_signature(repository, model) for model in models}
    server = new_grpc_server(settings)  # as convserve's: channel arguments and thread priority
    servicer = NoopServicer(signatures, settings.max_message_bytes)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    log.info("no-op KServe v2 server on %s:%d for %s", host, bound, ", ".join(models))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(grace=1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-repository", type=Path, required=True)
    parser.add_argument("--model", action="append", required=True, help="a model to mimic (repeatable)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(args.model_repository, args.model, args.host, args.port))


if __name__ == "__main__":
    main()
