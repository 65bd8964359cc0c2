"""A reference KServe v2 server on stock grpc.aio: `noop` answers zeros, `naive` runs the model inline.

    python -m bench.reference.grpc_server --mode naive --model-repository models \
        --model lenet5 --port 8101
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import grpc
import numpy as np

from bench.reference._proto.inference import grpc_predict_v2_pb2 as pb
from bench.reference._proto.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from bench.reference.model import Model, load


class Servicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, models: dict[str, Model], naive: bool) -> None:
        self.models = models
        self.naive = naive

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=True)

    async def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=request.name in self.models)

    async def ModelInfer(self, request, context):
        model = self.models.get(request.model_name)
        if model is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no model {request.model_name!r}")
        spec = request.inputs[0]
        batch = np.frombuffer(request.raw_input_contents[0], model.input_dtype).reshape(spec.shape)
        values = model.run(batch) if self.naive else model.zeros(batch)
        response = pb.ModelInferResponse(model_name=model.name, id=request.id)
        for output, array in zip(model.outputs, values, strict=True):
            response.outputs.add(name=output.name, datatype=output.datatype, shape=array.shape)
            response.raw_output_contents.append(array.tobytes())
        return response


async def serve(models: dict[str, Model], naive: bool, port: int) -> None:
    server = grpc.aio.server()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(Servicer(models, naive), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("noop", "naive"), required=True)
    parser.add_argument("--model-repository", type=Path, required=True)
    parser.add_argument("--model", action="append", required=True, help="repeatable")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    models = {name: load(args.model_repository, name) for name in args.model}
    asyncio.run(serve(models, args.mode == "naive", args.port))


if __name__ == "__main__":
    main()
