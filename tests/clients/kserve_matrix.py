"""The KServe Python SDK's inference clients, unmodified, against a running server: run by
test_client_matrix.py in the SDK's own venv. Prints what they saw, or the errors they raised, as JSON.

The SDK has no metadata call of its own: metadata is read with the gRPC stub it ships, and over
REST with httpx (the SDK's own HTTP library) into the SDK's own pydantic response models.

usage: python kserve_matrix.py HTTP_URL GRPC_HOST:PORT IMAGES.npy LATENT
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable
from importlib.metadata import version
from typing import Any

import grpc
import httpx
import numpy as np
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub
from kserve.protocol.infer_type import RequestedOutput
from kserve.protocol.rest.v2_datamodels import ModelMetadataResponse, ServerMetadataResponse


async def attempt(call: Awaitable[Any]) -> dict[str, Any]:
    """{"value": what the call returned} or {"error": the text the caller sees, "type": its class}."""
    try:
        return {"value": await call}
    except grpc.aio.AioRpcError as error:
        return {"error": error.details(), "type": "RpcError", "code": error.code().name}
    except httpx.HTTPStatusError as error:
        return {"error": str(error), "type": "HTTPStatusError", "status": error.response.status_code}
    except Exception as error:
        return {"error": f"{type(error).__name__}: {error}", "type": "client"}


def lenet_request(images: np.ndarray, binary: bool, request_id: str) -> InferRequest:
    image = InferInput("image", list(images.shape), "UINT8")
    image.set_data_from_numpy(images, binary_data=binary)
    logits = RequestedOutput("logits", parameters={"binary_data": binary})
    return InferRequest("lenet5", [image], request_id=request_id, request_outputs=[logits])


async def json_output_despite_binary_request(client: Any, url: str, images: np.ndarray) -> dict[str, Any]:
    """binary_data_output: true for the request, binary_data: false for the one output: the output's own
    parameter wins (Triton), so the answer is plain JSON, with no binary part and no header for it."""
    request = InferRequest(
        "lenet5",
        lenet_request(images, binary=True, request_id="mixed").inputs,
        request_id="mixed",
        parameters={"binary_data_output": True},
        request_outputs=[RequestedOutput("logits", parameters={"binary_data": False})],
    )
    headers: dict[str, str] = {}
    response = await client.infer(url, request, model_name="lenet5", response_headers=headers)
    (output,) = response.outputs
    return {
        "classes": output.as_numpy().argmax(axis=1).tolist(),
        "binary_part": "inference-header-content-length" in {k.lower() for k in headers},
    }


def dcgan_request(labels: list[int], latent: int) -> InferRequest:
    z = np.random.default_rng(0).standard_normal((len(labels), latent)).astype(np.float32)
    z_input = InferInput("z", list(z.shape), "FP32")
    z_input.set_data_from_numpy(z, binary_data=False)
    label = InferInput("label", [len(labels)], "INT64")
    label.set_data_from_numpy(np.array(labels, np.int64), binary_data=False)
    return InferRequest("dcgan", [z_input, label], request_id="dcgan")


async def classes(call: Awaitable[Any]) -> list[int]:
    (output,) = (await call).outputs
    return output.as_numpy().argmax(axis=1).tolist()


async def image(call: Awaitable[Any]) -> dict[str, Any]:
    (output,) = (await call).outputs
    return {"name": output.name, "datatype": output.datatype, "shape": list(output.as_numpy().shape)}


async def over_rest(url: str, images: np.ndarray, latent: int) -> dict[str, Any]:
    async with InferenceRESTClient(RESTConfig(protocol="v2", timeout=30)) as client:

        async def infer(request: InferRequest, model: str) -> Any:
            return await client.infer(url, request, model_name=model)

        # UINT8 pixels as JSON floats: the server must refuse them, and say why
        floats = InferInput("image", [1, 1, 32, 32], "UINT8", data=[0.5] * 1024)
        async with httpx.AsyncClient(base_url=url, timeout=30) as web:
            server = (await web.get("/v2")).json()
            metadata = (await web.get("/v2/models/lenet5")).json()
        return {
            "live": await client.is_server_live(url),
            "ready": await client.is_server_ready(url),
            "model_ready": await client.is_model_ready(url, "lenet5"),
            "unknown_ready": await client.is_model_ready(url, "no-such-model"),
            "server": ServerMetadataResponse.model_validate(server).model_dump(),
            "metadata": ModelMetadataResponse.model_validate(metadata).model_dump(),
            "binary_classes": await attempt(
                classes(infer(lenet_request(images, binary=True, request_id="rest-bin"), "lenet5"))
            ),
            "json_classes": await attempt(
                classes(infer(lenet_request(images, binary=False, request_id="rest-json"), "lenet5"))
            ),
            "json_output": await attempt(json_output_despite_binary_request(client, url, images)),
            "dcgan": await attempt(image(infer(dcgan_request([3, 7], latent), "dcgan"))),
            "unknown_model": await attempt(
                infer(lenet_request(images, binary=False, request_id="x"), "no-such-model")
            ),
            "json_floats": await attempt(infer(InferRequest("lenet5", [floats]), "lenet5")),
        }


async def over_grpc(target: str, images: np.ndarray, latent: int) -> dict[str, Any]:
    async with InferenceGRPCClient(target, timeout=30) as client:
        async with grpc.aio.insecure_channel(target) as channel:
            stub = GRPCInferenceServiceStub(channel)
            server = await stub.ServerMetadata(pb.ServerMetadataRequest())
            metadata = await stub.ModelMetadata(pb.ModelMetadataRequest(name="lenet5"))
        bad = np.zeros((1, 1, 28, 28), np.uint8)
        return {
            "live": await client.is_server_live(),
            "ready": await client.is_server_ready(),
            "model_ready": await client.is_model_ready("lenet5"),
            "unknown_ready": await attempt(client.is_model_ready("no-such-model")),
            "server": {"name": server.name, "version": server.version, "extensions": list(server.extensions)},
            "metadata": {
                "name": metadata.name,
                "inputs": [
                    {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in metadata.inputs
                ],
            },
            "binary_classes": await attempt(
                classes(client.infer(lenet_request(images, binary=True, request_id="grpc")))
            ),
            "dcgan": await attempt(image(client.infer(dcgan_request([3, 7], latent)))),
            "unknown_model": await attempt(
                client.infer(InferRequest("no-such-model", lenet_request(images, True, "x").inputs))
            ),
            "bad_shape": await attempt(client.infer(lenet_request(bad, binary=True, request_id="bad"))),
        }


async def main(http_url: str, grpc_target: str, images_path: str, latent: str) -> dict[str, Any]:
    images = np.load(images_path)
    return {
        "version": version("kserve"),
        "rest": await over_rest(http_url, images, int(latent)),
        "grpc": await over_grpc(grpc_target, images, int(latent)),
    }


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(*sys.argv[1:])), default=str))
