"""KServe v2 over HTTP/REST (port 8000), and small task routes for people without a client library.

aiohttp (maintained, asyncio-native) runs on the gRPC server's event loop. Every route is a
translator: it turns the HTTP request into the data plane's types, calls the data plane (the same
one gRPC calls) and writes its answer back, so validation, batching, statistics and metrics are
shared. JSON tensors and the binary tensor extension (`Inference-Header-Content-Length`,
`binary_data_size`, `binary_data_output`) are both understood.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from aiohttp import ClientConnectionError, ClientPayloadError, web

from service.codecs import tensors
from service.codecs.cost import Codec, Work
from service.codecs.kserve import model_config_json, model_statistics_json
from service.dataplane import DataPlane
from service.dataplane.calls import REQUEST_ID_KEY, CallInfo, CallObserver, Failure, new_request_id
from service.domain import (
    CaptionRequest,
    ClassifyRequest,
    EncodedImage,
    GenerateRequest,
    InferResult,
    LatentRequest,
    ModelInfo,
)
from service.errors import Cancelled, InvalidArgument, ModelNotFound, clip, clip_list, clip_message
from service.security.auth import STATIC_METHOD, AuthPolicy, http_middleware
from service.transports.http.console import ConsoleFiles
from service.transports.http.json_tensors import (
    BinaryOutputs,
    decode_header,
    decode_latents,
    parameters,
    parse_json,
    whole_number,
)
from service.transports.http.site import SERVER

HEADER_LENGTH = "Inference-Header-Content-Length"
#: The console's static files (served without a token, outside the call observation).
CONSOLE_FILE = STATIC_METHOD
#: Reads the console polls every few seconds: not logged or counted when they succeed.
POLLED = frozenset({"ListModels", "RecentStatistics"})
#: Scripts, styles, images and calls from this server only; never inside another site's frame.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
#: What reading a request raises when its client went away.
_CLIENT_GONE = (ConnectionError, ClientConnectionError, ClientPayloadError)
#: The OpenAPI document of these routes, shipped in the package (a copy is checked in under docs/).
OPENAPI = Path(__file__).with_name("openapi.json")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
#: The JSON part of a request, by default (Settings.max_json_bytes).
DEFAULT_MAX_JSON_BYTES = 8 * 1024 * 1024
#: The most characters of a request's path the access log shows.
PATH_CHARS = 128
#: The JSON body of a repository route (an index or load request: a few fields).
SMALL_JSON_BYTES = 64 * 1024
SMALL_JSON_LIMIT = "a repository request's limit"
#: Seconds a request's body may take to arrive, by default (Settings.http_body_timeout_seconds).
DEFAULT_BODY_TIMEOUT = 30.0
#: Seconds a client refused for a full queue should wait before it retries (`Retry-After`).
RETRY_AFTER_SECONDS = 1


def build_app(
    plane: DataPlane,
    max_body_bytes: int,
    policy: AuthPolicy | None = None,
    max_json_bytes: int = DEFAULT_MAX_JSON_BYTES,
    console: bool = True,
    body_timeout: float = DEFAULT_BODY_TIMEOUT,
) -> web.Application:
    """The routes; each is named after the gRPC method it shares, for metrics and the access log.

    `policy`: bearer-token rules (service/security/auth.py), applied inside the serving middleware so
    refusals (401/403) are logged and counted; none: open. Bodies are limited to `max_body_bytes`,
    their JSON part to `max_json_bytes` (over either: 413), the time they take to arrive to
    `body_timeout` seconds (over: 408). `console`: serve the web console's static files at / and
    /console/.
    """
    middlewares = [_serving_middleware, http_middleware(policy or AuthPolicy())]
    app = web.Application(middlewares=middlewares, client_max_size=max_body_bytes)
    app.on_response_prepare.append(_standard_headers)
    routes = Routes(plane, max_json_bytes, body_timeout)
    model = "/v2/models/{name}"
    versioned = "/v2/models/{name}/versions/{version}"
    table: list[tuple[str, str, Handler, str]] = [
        ("GET", "/v2/health/live", routes.live, "ServerLive"),
        ("GET", "/v2/health/ready", routes.ready, "ServerReady"),
        ("GET", "/v2", routes.server_metadata, "ServerMetadata"),
        ("GET", "/v2/models/stats", routes.model_statistics, "ModelStatistics"),  # all; before {name}
        ("GET", "/openapi.json", routes.openapi, "OpenAPI"),
        ("GET", "/v1/models", routes.list_models, "ListModels"),
        ("GET", "/v1/models/recent", routes.recent_statistics, "RecentStatistics"),
        ("GET", "/v1/latents", routes.latents, "Latents"),
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
    if console:
        files = ConsoleFiles()
        table += [
            ("GET", "/", files.index, CONSOLE_FILE),
            ("GET", "/console/{file}", files.file, CONSOLE_FILE),
        ]
    for number, (method, path, handler, name) in enumerate(table):
        app.router.add_route(method, path, handler, name=f"{name}.route{number}")  # names must be unique
    return app


async def _standard_headers(request: web.Request, response: web.StreamResponse) -> None:
    """On every answer: `Server: convserve` (not aiohttp's default naming the Python and aiohttp
    versions), and the content security policy and no MIME sniffing that the console relies on."""
    headers = response.headers
    headers["Server"] = SERVER
    headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    headers["X-Content-Type-Options"] = "nosniff"
    headers["Referrer-Policy"] = "no-referrer"


@web.middleware
async def _serving_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request id and the call observation (the error table, metrics, the access log), as on gRPC.

    The console's static files are not calls: they are answered without observation. The reads the
    console polls are observed but, when they succeed, neither logged nor counted (as health probes
    on gRPC); a refused or failed one is.
    """
    route = request.match_info.route.name or ""
    method = route.split(".", 1)[0] or "unrouted"
    if method == CONSOLE_FILE:
        return await handler(request)
    call = CallInfo(
        request_id=new_request_id(request.headers.get(REQUEST_ID_KEY)), method=method, transport="http"
    )
    with CallObserver(call, f"{request.method} {clip_message(request.path, PATH_CHARS)}") as observer:
        try:
            response = await handler(request)
        except _CLIENT_GONE:  # the client hung up, e.g. in the middle of the body: not our error
            response = _error(observer.failed(Cancelled("the client closed the connection")))
        except asyncio.CancelledError:  # it hung up while we worked: aiohttp cancels the handler
            observer.failed(Cancelled("the client closed the connection"))
            raise
        except web.HTTPException as exc:  # aiohttp's own: unknown route, body too large or slow
            message = exc.text if exc.status in (408, 413) and exc.text else exc.reason  # which limit
            wrapped = ModelNotFound(message) if exc.status == 404 else InvalidArgument(message)
            failure = observer.failed(wrapped)
            response = _error(Failure(replace(failure.status, http=exc.status), failure.message))
            if exc.status == 408:
                response.force_close()  # no further request on a connection this slow
        except Exception as exc:
            response = _error(observer.failed(exc))
        if observer.ok and response.status >= 400:  # a route's own "not ready" answer
            observer.ended(grpc.StatusCode.UNAVAILABLE, "")
        elif observer.ok and method in POLLED:
            observer.quiet = True
    response.headers[REQUEST_ID_KEY] = call.request_id
    return response


def _json(body: object, status: int = 200) -> web.Response:
    """A JSON answer as Triton writes it: `Content-Type: application/json`, no charset parameter
    (UTF-8 is JSON's encoding; some clients only read an error's text from exactly this type)."""
    return web.Response(body=json.dumps(body).encode(), status=status, content_type="application/json")


def _error(failure: Failure) -> web.Response:
    """An error's JSON answer; a full queue's says when to retry, as a 503 for overload should."""
    response = _json({"error": failure.message}, failure.status.http)
    if failure.status.code is grpc.StatusCode.UNAUTHENTICATED:
        response.headers["WWW-Authenticate"] = "Bearer"
    elif failure.status.code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
    return response


def _timeout(request: web.Request) -> float | None:
    """An optional `timeout` query parameter, in seconds (else the server's default)."""
    timeout = request.query.get("timeout")
    if timeout is None:
        return None
    try:
        return float(timeout)
    except ValueError:
        raise InvalidArgument(f"timeout must be a number of seconds, got {clip(timeout)}") from None


class Routes:
    """Translators between HTTP and the data plane; a few lines each."""

    def __init__(
        self,
        plane: DataPlane,
        max_json_bytes: int = DEFAULT_MAX_JSON_BYTES,
        body_timeout: float = DEFAULT_BODY_TIMEOUT,
    ) -> None:
        self.plane = plane
        self.max_json_bytes = max_json_bytes
        self.body_timeout = body_timeout
        self.openapi_document = OPENAPI.read_bytes()  # read once, not per request

    async def live(self, request: web.Request) -> web.Response:
        live = self.plane.live()
        return _json({"live": live}, status=200 if live else 503)

    async def ready(self, request: web.Request) -> web.Response:
        ready = self.plane.ready()
        return _json({"ready": ready}, status=200 if ready else 503)

    async def server_metadata(self, request: web.Request) -> web.Response:
        found = self.plane.server_metadata()
        return _json({"name": found.name, "version": found.version, "extensions": found.extensions})

    async def model_metadata(self, request: web.Request) -> web.Response:
        found = self.plane.model_metadata(*_model(request))

        def tensor(t: Any) -> dict[str, Any]:
            return {"name": t.name, "datatype": t.datatype, "shape": t.shape}

        body: dict[str, Any] = {"name": found.name}
        if found.versions:
            body["versions"] = found.versions
        body["platform"] = found.platform
        body["inputs"] = [tensor(t) for t in found.inputs]
        body["outputs"] = [tensor(t) for t in found.outputs]
        return _json(body)

    async def model_ready(self, request: web.Request) -> web.Response:
        """200 when ready; 503 for a model that exists but cannot answer now; 404 for an unknown one."""
        name, version = _model(request)
        ready = self.plane.model_ready(name, version, unknown_is_error=True)
        return _json({"name": name, "ready": ready}, status=200 if ready else 503)

    async def model_config(self, request: web.Request) -> web.Response:
        return _json(model_config_json(self.plane.model_config(*_model(request))))

    async def model_statistics(self, request: web.Request) -> web.Response:
        """One model's (version's) statistics, or every model's on /v2/models/stats (no name)."""
        found = self.plane.model_statistics(*_model(request))
        return _json({"model_stats": [model_statistics_json(s) for s in found]})

    async def openapi(self, request: web.Request) -> web.Response:
        return web.Response(body=self.openapi_document, content_type="application/json")

    async def repository_index(self, request: web.Request) -> web.Response:
        """Body {"ready": true|false} (optional); anything else is refused, never read loosely."""
        body = await self._json_body(request, "index", {"ready"})
        ready = body.get("ready", False)
        if not isinstance(ready, bool):
            raise InvalidArgument(f"ready must be true or false (a JSON boolean), got {clip(ready)}")
        rows = self.plane.repository_index(ready)
        return _json([_index_row(r.name, r.version, r.state, r.reason) for r in rows])

    async def load(self, request: web.Request) -> web.Response:
        body = await self._json_body(request, "load", {"parameters"})
        await self.plane.load(request.match_info["name"], parameters(body.get("parameters"), "load"))
        return _json({})

    async def unload(self, request: web.Request) -> web.Response:
        body = await self._json_body(request, "unload", {"parameters"})
        await self.plane.unload(request.match_info["name"], parameters(body.get("parameters"), "unload"))
        return _json({})

    async def infer(self, request: web.Request) -> web.Response:
        name, version = _model(request)
        header_length = request.headers.get(HEADER_LENGTH)
        declared = (
            request.content_length if header_length is None else whole_number(header_length, HEADER_LENGTH)
        )
        _check_json_length(declared, self.max_json_bytes)  # before a byte of the body is read
        body = await self._read_body(request)
        json_end = _json_end(body, header_length, self.max_json_bytes)
        decoded = await self.plane.offload(  # a large body: in another process, as json_tensors says
            Work(Codec.JSON, json_end), partial(decode_header, body[:json_end], len(body), name, version)
        )
        result = await self.plane.infer(decoded.with_binary_data(body), _timeout(request))
        return _infer_response(result, decoded.binary)

    async def classify(self, request: web.Request) -> web.Response:
        """POST an image (PNG, JPEG or BMP) as the body: ?model=lenet5&top_k=3."""
        query = request.query
        found = await self.plane.classify(
            ClassifyRequest(
                model=query.get("model", "lenet5"),
                version=query.get("version", ""),
                images=[EncodedImage(await self._read_body(request))],
                top_k=whole_number(query["top_k"], "top_k") if "top_k" in query else None,
            ),
            _timeout(request),
        )
        predictions = [{"label": p.label, "index": p.index, "score": p.score} for p in found.results[0]]
        return _json({"model": found.model, "version": found.version, "predictions": predictions})

    async def generate(self, request: web.Request) -> web.Response:
        """One PNG: ?model=dcgan&count=16&label=7&seed=1 (several images come as one grid); a JSON
        body {"latents": [[...], ...]} gives the latent vectors instead of the seed (one image each)."""
        query = request.query
        latents = await self._latents_body(request)
        count = whole_number(query["count"], "count") if "count" in query else None
        images = count if count is not None else 1 if latents is None else len(latents)
        found = await self.plane.generate(
            GenerateRequest(
                model=query.get("model", "dcgan"),
                version=query.get("version", ""),
                count=count,
                labels=[whole_number(label, "label") for label in query.getall("label", [])],
                seed=whole_number(query["seed"], "seed") if "seed" in query else None,
                grid=images > 1,
                latents=latents,
            ),
            _timeout(request),
        )
        png = found.grid_png or found.images[0].png
        headers = {"x-seed": str(found.seed), "x-labels": ",".join(i.label for i in found.images)}
        return web.Response(body=png, content_type="image/png", headers=headers)

    async def caption(self, request: web.Request) -> web.Response:
        """POST an image as the body: ?model=captioner&beam=3&max_length=24&count=1&attention=1."""
        query = request.query
        options = {
            field: whole_number(query[name], name) if name in query else None
            for name, field in (("beam", "beam_size"), ("max_length", "max_length"), ("count", "count"))
        }
        found = await self.plane.caption(
            CaptionRequest(
                model=query.get("model", "captioner"),
                version=query.get("version", ""),
                images=[EncodedImage(await self._read_body(request))],
                attention=query.get("attention", "").lower() in ("1", "true", "yes"),
                **options,
            ),
            _timeout(request),
        )
        captions = []
        for c in found.results[0]:
            entry: dict[str, Any] = {
                "text": c.text,
                "words": c.words,
                "log_prob": c.log_prob,
                "mean_log_prob": c.mean_log_prob,
            }
            if c.attention:
                entry["attention"] = [
                    {"rows": a.rows, "columns": a.columns, "weights": a.weights} for a in c.attention
                ]
            captions.append(entry)
        answer: dict[str, Any] = {"model": found.model, "version": found.version, "captions": captions}
        if found.regions and found.regions[0]:
            answer["regions"] = [[r.left, r.top, r.right, r.bottom] for r in found.regions[0]]
        return _json(answer)

    async def list_models(self, request: web.Request) -> web.Response:
        """Every model: kind, versions with state and execution provider, input spec, labels."""
        return _json({"models": [_model_row(m) for m in self.plane.models()]})

    async def recent_statistics(self, request: web.Request) -> web.Response:
        """Each version's requests over the last minute: rate, failures, p50 and p99 latency."""
        rows = [
            {
                "name": r.name,
                "version": r.version,
                "window_seconds": r.window_seconds,
                "requests": r.requests,
                "failures": r.failures,
                "rate": round(r.requests / r.window_seconds, 3),
                "p50_seconds": r.p50,
                "p99_seconds": r.p99,
                "per_second": r.per_second,
            }
            for r in self.plane.recent_statistics()
        ]
        return _json({"models": rows})

    async def latents(self, request: web.Request) -> web.Response:
        """The latent vectors a generator draws for a seed: ?model=dcgan&seed=5&count=1."""
        query = request.query
        found = self.plane.latents(
            LatentRequest(
                model=query.get("model", "dcgan"),
                version=query.get("version", ""),
                seed=whole_number(query["seed"], "seed") if "seed" in query else None,
                count=whole_number(query["count"], "count") if "count" in query else None,
            )
        )
        return _json(
            {
                "model": found.model,
                "version": found.version,
                "seed": found.seed,
                "latents": found.latents.tolist(),
            }
        )

    async def _latents_body(self, request: web.Request) -> np.ndarray | None:
        """A generate request's latent vectors, from its JSON body; None without a body."""
        if not request.can_read_body:
            return None
        _check_json_length(request.content_length, self.max_json_bytes)
        raw = await self._read_body(request)
        if not raw.strip():
            return None
        _json_end(raw, None, self.max_json_bytes)
        return await self.plane.offload(Work(Codec.JSON, len(raw)), partial(decode_latents, raw))

    async def _read_body(self, request: web.Request) -> bytes:
        """The whole body, which must arrive within `body_timeout` seconds (else 408): a client that
        trickles bytes would otherwise hold its connection, and what it sent, as long as it likes."""
        try:
            async with asyncio.timeout(self.body_timeout):
                return await request.read()
        except TimeoutError:
            raise web.HTTPRequestTimeout(
                text=f"the request body did not arrive within {self.body_timeout:g} s "
                "(http_body_timeout_seconds)"
            ) from None

    async def _json_body(self, request: web.Request, what: str, fields: set[str]) -> dict[str, Any]:
        """A repository request's JSON object body ({} without a body), holding only `fields`: a field
        the server would not act on is refused, never ignored."""
        if not request.can_read_body:
            return {}
        _check_json_length(request.content_length, SMALL_JSON_BYTES, SMALL_JSON_LIMIT)
        raw = await self._read_body(request)
        _check_json_length(len(raw), SMALL_JSON_BYTES, SMALL_JSON_LIMIT)
        if not raw.strip():
            return {}
        body = parse_json(raw)  # small: on the event loop
        if not isinstance(body, dict):
            raise InvalidArgument("request body must be a JSON object")
        unknown = sorted(set(body) - fields)
        if unknown:
            allowed = " and ".join(repr(f) for f in sorted(fields))
            raise InvalidArgument(f"the {what} request takes only {allowed}, not {clip_list(unknown)}")
        return body


def _model_row(model: ModelInfo) -> dict[str, Any]:
    """A model as ListModels answers it; states in capitals, as the gRPC API and the CLI name them."""
    spec = model.input
    return {
        "name": model.name,
        "kind": model.kind,
        "versions": [
            {"version": v.version, "state": v.state.upper(), "reason": v.reason, "provider": v.provider}
            for v in model.versions
        ],
        "input": None
        if spec is None
        else {
            "name": spec.name,
            "height": spec.height,
            "width": spec.width,
            "channels": spec.channels,
            "color_mode": spec.color_mode,
        },
        "labels": model.labels,
    }


def _index_row(name: str, version: str, state: str, reason: str) -> dict[str, str]:
    """A repository index row as the REST binding writes it: empty fields left out."""
    row = {"name": name, "version": version, "state": state, "reason": reason}
    return {key: value for key, value in row.items() if value}


def _model(request: web.Request) -> tuple[str, str]:
    """The model name and version of a route ("" where the route names none)."""
    return request.match_info.get("name", ""), request.match_info.get("version", "")


def _json_end(body: bytes, header_length: str | None, max_json_bytes: int) -> int:
    """Where a body's JSON part ends (all of it without `Inference-Header-Content-Length`); 413 when
    the JSON part is larger than `max_json_bytes` (larger tensors go as binary data)."""
    json_end = len(body) if header_length is None else whole_number(header_length, HEADER_LENGTH)
    if not 0 <= json_end <= len(body):
        raise InvalidArgument(f"{HEADER_LENGTH} is {json_end} but the body has {len(body)} bytes")
    _check_json_length(json_end, max_json_bytes)
    return json_end


def _check_json_length(json_length: int | None, max_json_bytes: int, limit: str = "") -> None:
    """413 when a request's JSON part is larger than `max_json_bytes`. Checked on the length a client
    declares (Content-Length, Inference-Header-Content-Length) before its body is read, so a client
    learns at once and the server reads nothing it would throw away; and on what was read (a chunked
    body declares none)."""
    if json_length is not None and json_length > max_json_bytes:
        raise web.HTTPRequestEntityTooLarge(
            max_size=max_json_bytes,
            actual_size=json_length,
            text=f"the JSON part of the request is {json_length} bytes, over the limit of "
            f"{max_json_bytes} ({limit or 'max_json_bytes; send large tensors as binary data'})",
        )


def _infer_response(result: InferResult, binary: BinaryOutputs) -> web.Response:
    outputs, blobs = [], []
    for name, array in result.outputs:
        datatype, raw = tensors.encode_raw(array)
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if name in binary:
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        elif datatype == "BYTES":
            entry["data"] = [_text(v) for v in array.ravel()]
        else:
            entry["data"] = array.ravel().tolist()
        outputs.append(entry)
    header = {"model_name": result.model, "model_version": result.version, "outputs": outputs}
    if result.id:
        header["id"] = result.id
    text = json.dumps(header).encode()
    if not blobs:
        return web.Response(body=text, content_type="application/json")
    return web.Response(
        body=b"".join([text, *blobs]),
        content_type="application/octet-stream",
        headers={HEADER_LENGTH: str(len(text))},
    )


def _text(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
