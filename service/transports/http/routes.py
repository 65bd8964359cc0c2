"""KServe v2 over HTTP/REST (port 8000), and small task routes for people without a client library.

aiohttp (maintained, asyncio-native) runs on the gRPC server's event loop, and every route calls
the same servicer methods as gRPC: one data plane, so validation, batching, statistics and
metrics are shared. JSON tensors and the binary tensor extension (`Inference-Header-Content-Length`,
`binary_data_size`, `binary_data_output`) are both understood.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import numpy as np
from aiohttp import web
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from service._proto.convserve.v1 import vision_pb2 as vision_pb
from service._proto.inference import grpc_predict_v2_pb2 as pb
from service.codecs import tensors
from service.errors import InvalidArgument, status_for
from service.security.auth import AuthError, AuthPolicy, http_middleware
from service.transports.calls import (
    REQUEST_ID_KEY,
    CallInfo,
    begin_call,
    end_call,
    new_request_id,
    record_call,
)
from service.transports.grpc.common import default_deadline
from service.transports.grpc.kserve import KServeServicer
from service.transports.grpc.vision import VisionServicer

log = logging.getLogger(__name__)

HEADER_LENGTH = "Inference-Header-Content-Length"
#: gRPC status -> HTTP status, as the Open Inference Protocol's REST binding expects them.
HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def build_app(
    kserve: KServeServicer, vision: VisionServicer, max_body_bytes: int, policy: AuthPolicy | None = None
) -> web.Application:
    """The routes; each is named after the gRPC method it shares, for metrics and the access log.

    `policy`: bearer-token rules (service/security/auth.py), applied inside the serving middleware so refusals
    (401/403) are logged and counted; none: open.
    """
    middlewares = [_serving_middleware, http_middleware(policy or AuthPolicy())]
    app = web.Application(middlewares=middlewares, client_max_size=max_body_bytes)
    routes = Routes(kserve, vision)
    model = "/v2/models/{name}"
    versioned = "/v2/models/{name}/versions/{version}"
    table: list[tuple[str, str, Handler, str]] = [
        ("GET", "/v2/health/live", routes.live, "ServerLive"),
        ("GET", "/v2/health/ready", routes.ready, "ServerReady"),
        ("GET", "/v2", routes.server_metadata, "ServerMetadata"),
        ("POST", "/v2/repository/index", routes.repository_index, "RepositoryIndex"),
        ("POST", "/v2/repository/models/{name}/load", routes.load, "RepositoryModelLoad"),
        ("POST", "/v2/repository/models/{name}/unload", routes.unload, "RepositoryModelUnload"),
        ("POST", "/v1/classify", routes.classify, "Classify"),
        ("POST", "/v1/generate", routes.generate, "Generate"),
        ("POST", "/v1/caption", routes.caption, "Caption"),
    ]
    for base in (model, versioned):
        table += [
            ("GET", base, routes.model_metadata, "ModelMetadata"),
            ("GET", base + "/ready", routes.model_ready, "ModelReady"),
            ("GET", base + "/config", routes.model_config, "ModelConfig"),
            ("GET", base + "/stats", routes.model_statistics, "ModelStatistics"),
            ("POST", base + "/infer", routes.infer, "ModelInfer"),
        ]
    for number, (method, path, handler, name) in enumerate(table):
        app.router.add_route(method, path, handler, name=f"{name}.route{number}")  # names must be unique
    return app


@web.middleware
async def _serving_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request id, the error table, metrics and the access log, as the gRPC interceptor does."""
    route = request.match_info.route.name or ""
    method = route.split(".", 1)[0] or "unrouted"
    call = CallInfo(
        request_id=new_request_id(request.headers.get(REQUEST_ID_KEY)), method=method, transport="http"
    )
    token = begin_call(call)
    started = time.perf_counter()
    code, message = grpc.StatusCode.OK, ""
    try:
        response = await handler(request)
    except AuthError as exc:
        code, message = exc.code, str(exc)
        response = _error(HTTP_STATUS[code], message)
        if code is grpc.StatusCode.UNAUTHENTICATED:
            response.headers["WWW-Authenticate"] = "Bearer"
    except web.HTTPException as exc:  # aiohttp's own: unknown route, body too large
        code, message = (
            grpc.StatusCode.NOT_FOUND if exc.status == 404 else grpc.StatusCode.INVALID_ARGUMENT,
            exc.reason,
        )
        response = _error(exc.status, exc.reason)
    except Exception as exc:
        code, message = status_for(exc)
        if code is grpc.StatusCode.INTERNAL:
            log.exception(
                "unhandled error in %s", request.path, extra={"fields": {"request_id": call.request_id}}
            )
        response = _error(HTTP_STATUS.get(code, 500), message)
    finally:
        end_call(token)
    if code is grpc.StatusCode.OK and response.status >= 400:  # a route's own "not ready" answer
        code = grpc.StatusCode.UNAVAILABLE
    record_call(call, f"{request.method} {request.path}", code, message, time.perf_counter() - started)
    response.headers[REQUEST_ID_KEY] = call.request_id
    return response


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _json(message: Message) -> web.Response:
    return web.json_response(_plain(message))


def _plain(message: Message) -> dict[str, Any]:
    """A message as the REST binding writes it: numbers as numbers (protobuf's JSON quotes int64)."""
    out: dict[str, Any] = {}
    for field, value in message.ListFields():
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            out[field.name] = {key: _scalar(value_field, item) for key, item in value.items()}
        elif field.is_repeated:
            out[field.name] = [_scalar(field, item) for item in value]
        else:
            out[field.name] = _scalar(field, value)
    return out


def _scalar(field: FieldDescriptor, value: Any) -> Any:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return _plain(value)
    if field.type == FieldDescriptor.TYPE_ENUM:
        return field.enum_type.values_by_number[value].name
    if field.type == FieldDescriptor.TYPE_BYTES:
        return base64.b64encode(value).decode()
    return value


def _deadline(request: web.Request) -> float | None:
    """An optional `timeout` query parameter, in seconds, as the request's deadline (else the default)."""
    timeout = request.query.get("timeout")
    if timeout is None:
        return default_deadline()
    try:
        seconds = float(timeout)
    except ValueError:
        raise InvalidArgument(f"timeout must be a number of seconds, got {timeout!r}") from None
    return asyncio.get_running_loop().time() + seconds


class Routes:
    """Translators between HTTP and the shared servicers; a few lines each."""

    def __init__(self, kserve: KServeServicer, vision: VisionServicer) -> None:
        self.kserve = kserve
        self.vision = vision

    async def live(self, request: web.Request) -> web.Response:
        live = (await self.kserve.ServerLive(pb.ServerLiveRequest(), None)).live
        return web.json_response({"live": live}, status=200 if live else 503)

    async def ready(self, request: web.Request) -> web.Response:
        ready = (await self.kserve.ServerReady(pb.ServerReadyRequest(), None)).ready
        return web.json_response({"ready": ready}, status=200 if ready else 503)

    async def server_metadata(self, request: web.Request) -> web.Response:
        return _json(await self.kserve.ServerMetadata(pb.ServerMetadataRequest(), None))

    async def model_metadata(self, request: web.Request) -> web.Response:
        name, version = _model(request)
        return _json(
            await self.kserve.ModelMetadata(pb.ModelMetadataRequest(name=name, version=version), None)
        )

    async def model_ready(self, request: web.Request) -> web.Response:
        name, version = _model(request)
        ready = (await self.kserve.ModelReady(pb.ModelReadyRequest(name=name, version=version), None)).ready
        return web.json_response({"name": name, "ready": ready}, status=200 if ready else 503)

    async def model_config(self, request: web.Request) -> web.Response:
        name, version = _model(request)
        response = await self.kserve.ModelConfig(pb.ModelConfigRequest(name=name, version=version), None)
        return web.json_response(_plain(response.config))

    async def model_statistics(self, request: web.Request) -> web.Response:
        name, version = _model(request)
        return _json(
            await self.kserve.ModelStatistics(pb.ModelStatisticsRequest(name=name, version=version), None)
        )

    async def repository_index(self, request: web.Request) -> web.Response:
        body = await request.json() if request.can_read_body else {}
        index = await self.kserve.RepositoryIndex(
            pb.RepositoryIndexRequest(ready=bool(body.get("ready"))), None
        )
        rows = [_plain(m) for m in index.models]
        return web.json_response(rows)

    async def load(self, request: web.Request) -> web.Response:
        parameters = (await request.json()).get("parameters") if request.can_read_body else None
        if parameters:
            raise InvalidArgument(f"repository parameters are not supported (got {sorted(parameters)})")
        await self.kserve.RepositoryModelLoad(
            pb.RepositoryModelLoadRequest(model_name=request.match_info["name"]), None
        )
        return web.json_response({})

    async def unload(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        await self.kserve.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name=name), None)
        return web.json_response({})

    async def infer(self, request: web.Request) -> web.Response:
        name, version = _model(request)
        body = await request.read()
        infer_request, binary_out = _infer_request(body, request.headers.get(HEADER_LENGTH), name, version)
        response = await self.kserve.infer(infer_request, _deadline(request))
        return _infer_response(response, binary_out)

    async def classify(self, request: web.Request) -> web.Response:
        """POST an image (PNG, JPEG or BMP) as the body: ?model=lenet5&top_k=3."""
        query = request.query
        classify = vision_pb.ClassifyRequest(
            model=query.get("model", "lenet5"),
            version=query.get("version", ""),
            images=[vision_pb.Image(encoded=await request.read())],
        )
        if "top_k" in query:
            classify.top_k = _int(query["top_k"], "top_k")
        response = await self.vision.classify(classify, _deadline(request))
        predictions = [
            {"label": p.label, "index": p.index, "score": p.score} for p in response.results[0].predictions
        ]
        return web.json_response(
            {"model": response.model, "version": response.version, "predictions": predictions}
        )

    async def generate(self, request: web.Request) -> web.Response:
        """One PNG: ?model=dcgan&count=16&label=7&seed=1 (several images come as one grid)."""
        query = request.query
        generate = vision_pb.GenerateRequest(
            model=query.get("model", "dcgan"),
            version=query.get("version", ""),
            labels=[_int(label, "label") for label in query.getall("label", [])],
        )
        generate.count = _int(query.get("count", "1"), "count")
        generate.grid = generate.count > 1
        if "seed" in query:
            generate.seed = _int(query["seed"], "seed")
        response = await self.vision.generate(generate, _deadline(request))
        png = response.grid_png or response.images[0].png
        headers = {"x-seed": str(response.seed), "x-labels": ",".join(i.label for i in response.images)}
        return web.Response(body=png, content_type="image/png", headers=headers)

    async def caption(self, request: web.Request) -> web.Response:
        """POST an image as the body: ?model=captioner&beam=3&max_length=24&count=1&attention=1."""
        query = request.query
        caption = vision_pb.CaptionRequest(
            model=query.get("model", "captioner"),
            version=query.get("version", ""),
            images=[vision_pb.Image(encoded=await request.read())],
            return_attention=query.get("attention", "").lower() in ("1", "true", "yes"),
        )
        for name, field in (("beam", "beam_size"), ("max_length", "max_length"), ("count", "count")):
            if name in query:
                setattr(caption, field, _int(query[name], name))
        response = await self.vision.caption(caption, _deadline(request))
        captions = []
        for c in response.results[0].captions:
            entry: dict[str, Any] = {"text": c.text, "words": list(c.words), "log_prob": c.log_prob}
            if c.attention:
                entry["attention"] = [
                    {"rows": a.rows, "columns": a.columns, "weights": list(a.weights)} for a in c.attention
                ]
            captions.append(entry)
        return web.json_response({"model": response.model, "version": response.version, "captions": captions})


def _model(request: web.Request) -> tuple[str, str]:
    return request.match_info["name"], request.match_info.get("version", "")


def _int(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise InvalidArgument(f"{what} must be an integer, got {text!r}") from None


def _infer_request(
    body: bytes, header_length: str | None, name: str, version: str
) -> tuple[pb.ModelInferRequest, set[str] | bool]:
    """The JSON (+ binary) body as a ModelInferRequest with raw contents for every input.

    Returns the request and which outputs to answer in binary: a set of names, or True for all.
    """
    json_end = len(body) if header_length is None else _int(header_length, HEADER_LENGTH)
    if not 0 <= json_end <= len(body):
        raise InvalidArgument(f"{HEADER_LENGTH} is {json_end} but the body has {len(body)} bytes")
    try:
        header = json.loads(body[:json_end])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidArgument(f"request body is not valid JSON: {exc}") from None
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list):
        raise InvalidArgument('request body must be a JSON object with an "inputs" list')
    infer = pb.ModelInferRequest(model_name=name, model_version=version, id=str(header.get("id", "")))
    offset = json_end
    for item in header["inputs"]:
        tensor, raw, offset = _input(item, body, offset)
        infer.inputs.append(tensor)
        infer.raw_input_contents.append(raw)
    if offset != len(body):
        raise InvalidArgument(f"{len(body) - offset} bytes of binary data follow the inputs that claim none")
    parameters = header.get("parameters") or {}
    binary: set[str] | bool = bool(parameters.get("binary_data_output", False))
    requested = header.get("outputs") or []
    for output in requested:
        infer.outputs.add(name=str(output.get("name", "")))
    if not binary:
        binary = {str(o.get("name")) for o in requested if (o.get("parameters") or {}).get("binary_data")}
    return infer, binary


def _input(item: Any, body: bytes, offset: int) -> tuple[pb.ModelInferRequest.InferInputTensor, bytes, int]:
    if not isinstance(item, dict):
        raise InvalidArgument("each input must be a JSON object with name, shape, datatype and data")
    name, datatype, shape = str(item.get("name", "")), str(item.get("datatype", "")), item.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) for d in shape):
        raise InvalidArgument(f"input {name!r}: shape must be a list of integers")
    tensor = pb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=shape)
    size = (item.get("parameters") or {}).get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or size < 0 or offset + size > len(body):
            raise InvalidArgument(f"input {name!r}: binary_data_size {size} does not fit the body")
        return tensor, body[offset : offset + size], offset + size
    kind = tensors.datatype(datatype, what=f"input {name!r}")
    count = tensors.element_count(shape, what=f"input {name!r}")
    data = item.get("data")
    if data is None:
        raise InvalidArgument(f"input {name!r} has neither data nor binary_data_size")
    if kind.name == "BYTES":
        elements = list(np.ravel(np.array(data, dtype=object)))
        raw = tensors.encode_bytes(e.encode() if isinstance(e, str) else e for e in elements)
        found = len(elements)
    else:
        try:
            array = np.asarray(data, dtype=kind.dtype).ravel()
        except (TypeError, ValueError, OverflowError):
            raise InvalidArgument(f"input {name!r}: data is not a list of {datatype} numbers") from None
        raw, found = array.tobytes(), array.size
    if found != count:
        raise InvalidArgument(f"input {name!r}: shape {shape} needs {count} elements, data has {found}")
    return tensor, raw, offset


def _infer_response(response: pb.ModelInferResponse, binary: set[str] | bool) -> web.Response:
    outputs, blobs = [], []
    for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        entry: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": list(tensor.shape),
        }
        if binary is True or (isinstance(binary, set) and tensor.name in binary):
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            array = tensors.decode_output(tensor, raw)
            values = (
                [v.decode(errors="replace") for v in array.ravel()]
                if tensor.datatype == "BYTES"
                else array.ravel().tolist()
            )
            entry["data"] = values
        outputs.append(entry)
    header = {"model_name": response.model_name, "model_version": response.model_version, "outputs": outputs}
    if response.id:
        header["id"] = response.id
    text = json.dumps(header).encode()
    if not blobs:
        return web.Response(body=text, content_type="application/json")
    return web.Response(
        body=b"".join([text, *blobs]),
        content_type="application/octet-stream",
        headers={HEADER_LENGTH: str(len(text))},
    )
