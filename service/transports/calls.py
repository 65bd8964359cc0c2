"""What every RPC goes through, wrapped around each servicer method once at registration.

Unary calls get a request id, access control, the error table, the access log and request
metrics; streaming calls get access control. The servicer fills in the model and version it used
(`current_call()`), so the log line and the metrics carry them without the servicer knowing.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar, Token
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError

from service.errors import InvalidArgument, status_for
from service.observability import metrics
from service.observability.statistics import RequestTimes, VersionStatistics
from service.security.auth import AuthError, AuthPolicy, MethodAccess, metadata_value

log = logging.getLogger("convserve.access")

REQUEST_ID_KEY = "x-request-id"
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
#: A client's deadline cancels its call slightly before the server's copy of it expires (the
#: server's clock starts when the request arrives), so a cancellation this close to the deadline
#: is the deadline passing, not the client giving up.
CLIENT_DEADLINE_SLACK_SECONDS = 0.05
# Probes and tooling: no access log line at INFO and no request metrics.
_QUIET_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")
# Fresh request ids: a random prefix per process and a counter, unique without a uuid4 per call
# (os.urandom and a UUID object cost about 1% of a small model's throughput).
_ID_PREFIX = secrets.token_hex(8)
_id_counter = itertools.count()


@dataclass
class CallInfo:
    request_id: str
    method: str
    model: str = ""
    version: str = ""
    images: int = 0
    transport: str = "grpc"
    stats: VersionStatistics | None = None  # of the version that answered, once known
    times: RequestTimes | None = None  # an inference request's stage times, committed when it answers


T = TypeVar("T")

_current: ContextVar[CallInfo | None] = ContextVar("convserve_call", default=None)


def current_call() -> CallInfo:
    """The running RPC's record; a throwaway one outside an RPC (e.g. in unit tests)."""
    call = _current.get()
    return call if call is not None else CallInfo(request_id="", method="")


def register(
    server: grpc.aio.Server, add_to_server: Callable[[Any, Any], None], servicer: object, policy: AuthPolicy
) -> None:
    """Register a servicer through its generated `add_*_to_server`, each method wrapped once.

    Wrapping at registration, rather than with grpc.aio interceptors, costs nothing per call
    beyond the wrapper itself: an interceptor chain runs for every call and builds a new handler
    each time (measured: about 7% of a no-op server's throughput on one core).
    """
    registrar = _Registrar(server, policy)
    add_to_server(servicer, registrar)
    if not registrar.services:
        raise RuntimeError(f"{add_to_server.__name__} registered no service by name")


class _Registrar:
    """Stands in for the server in generated `add_*_to_server` functions.

    They hand the same handlers over twice, as a generic handler and by service name; the named
    ones are wrapped and registered both ways on the real server.
    """

    def __init__(self, server: grpc.aio.Server, policy: AuthPolicy) -> None:
        self._server = server
        self._policy = policy
        self.services: list[str] = []

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        """Ignored: the same methods come by name in add_registered_method_handlers."""

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        wrapped = {
            name: wrap_handler(f"/{service}/{name}", handler, self._policy)
            for name, handler in handlers.items()
        }
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, wrapped),))
        self._server.add_registered_method_handlers(service, wrapped)
        self.services.append(service)


def wrap_handler(
    full_method: str, handler: grpc.RpcMethodHandler, policy: AuthPolicy
) -> grpc.RpcMethodHandler:
    """Unary calls: access control, request id, the error table, log and metrics; streams: access control."""
    access = MethodAccess(policy, full_method)
    if handler.unary_unary is not None:
        quiet = full_method.startswith(_QUIET_PREFIXES)
        wrapped = _wrap_unary(handler.unary_unary, full_method, quiet, handler.request_deserializer, access)
        # The request arrives as bytes and is parsed inside the call: a message grpc cannot parse
        # (e.g. invalid UTF-8 in a string field) is then INVALID_ARGUMENT, counted and logged,
        # instead of grpc's own UNKNOWN before any of our code runs.
        return grpc.unary_unary_rpc_method_handler(
            wrapped, request_deserializer=None, response_serializer=handler.response_serializer
        )
    serializers = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(_guard(handler.unary_stream, access), **serializers)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(_guard(handler.stream_unary, access), **serializers)
    return grpc.stream_stream_rpc_method_handler(_guard(handler.stream_stream, access), **serializers)


def _guard(behavior: Callable[..., Any], access: MethodAccess) -> Callable[..., Any]:
    """A streaming method behind the access check; it keeps its kind (async generator or coroutine)."""
    if inspect.isasyncgenfunction(behavior):

        async def generator(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await _check_access(access, context)
            async for item in behavior(request, context):
                yield item

        return generator

    async def coroutine(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await _check_access(access, context)
        return await behavior(request, context)

    return coroutine


async def _check_access(access: MethodAccess, context: grpc.aio.ServicerContext) -> None:
    try:
        access.check(context.invocation_metadata())
    except AuthError as exc:
        await context.abort(exc.code, str(exc))


def _request_id(metadata: Any) -> str:
    offered = metadata_value(metadata, REQUEST_ID_KEY)
    return new_request_id(offered)


def _wrap_unary(
    behavior: Callable[..., Any],
    full_method: str,
    quiet: bool,
    parse: Callable[[bytes], Any] | None,
    access: MethodAccess,
) -> Callable:
    method = full_method.rsplit("/", 1)[-1]

    def parsed(request: Any) -> Any:
        if parse is None:
            return request
        try:
            return parse(request)
        except DecodeError:
            raise InvalidArgument(f"the request is not a valid {method} message") from None

    async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
        metadata = context.invocation_metadata()
        request_id = _request_id(metadata)
        call = CallInfo(request_id=request_id, method=method)
        token = _current.set(call)
        start = time.perf_counter()
        code, message = grpc.StatusCode.OK, ""
        trailing = ((REQUEST_ID_KEY, request_id),)
        context.set_trailing_metadata(trailing)
        try:
            access.check(metadata)
            return await behavior(parsed(request), context)
        except asyncio.CancelledError:  # grpc cancels the handler at the client's deadline too
            remaining = context.time_remaining()
            if remaining is not None and remaining <= CLIENT_DEADLINE_SLACK_SECONDS:
                code, message = grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded"
            else:
                code, message = grpc.StatusCode.CANCELLED, "cancelled by the client"
            raise
        except grpc.aio.AbortError:
            code, message = context.code() or grpc.StatusCode.UNKNOWN, context.details() or ""
            raise
        except AuthError as exc:
            code, message = exc.code, str(exc)
            await context.abort(code, message, trailing_metadata=trailing)
        except Exception as exc:
            code, message = status_for(exc)
            if code is grpc.StatusCode.INTERNAL:
                log.exception(
                    "unhandled error in %s", full_method, extra={"fields": {"request_id": request_id}}
                )
            await context.abort(code, message, trailing_metadata=trailing)
        finally:
            elapsed = time.perf_counter() - start
            _current.reset(token)
            if not quiet:
                record_call(call, full_method, code, message, elapsed)

    return wrapped


async def observe_message(full_method: str, request_id: str, work: Callable[[], Awaitable[T]]) -> T:
    """One message of a streaming RPC, logged and counted like a unary call; errors propagate."""
    call = CallInfo(request_id=new_request_id(request_id), method=full_method.rsplit("/", 1)[-1])
    token = _current.set(call)
    start = time.perf_counter()
    code, message = grpc.StatusCode.OK, ""
    try:
        return await work()
    except asyncio.CancelledError:
        code, message = grpc.StatusCode.CANCELLED, "stream closed"
        raise
    except Exception as exc:
        code, message = status_for(exc)
        if code is grpc.StatusCode.INTERNAL:
            log.exception(
                "unhandled error in %s", full_method, extra={"fields": {"request_id": call.request_id}}
            )
        raise
    finally:
        _current.reset(token)
        record_call(call, full_method, code, message, time.perf_counter() - start)


def begin_call(call: CallInfo) -> Token[CallInfo | None]:
    """Make `call` the current one (for servicers' `current_call()`); pair with `end_call`."""
    return _current.set(call)


def end_call(token: Token[CallInfo | None]) -> None:
    _current.reset(token)


def new_request_id(offered: str | None) -> str:
    """The client's request id when it is a sane one, else a fresh one."""
    if offered and _VALID_REQUEST_ID.match(offered):
        return offered
    return f"{_ID_PREFIX}{next(_id_counter):016x}"  # 32 hex digits, as a uuid4


_CallMetrics = tuple[Any, Any]  # the request counter's and the duration histogram's children
_call_metrics_cache: dict[tuple[str, str, str, grpc.StatusCode, str], _CallMetrics] = {}


def _call_metrics(
    model: str, version: str, method: str, code: grpc.StatusCode, transport: str
) -> _CallMetrics:
    """The labelled metrics of one kind of call, looked up once (a `labels()` call locks and
    stringifies every label: two per call cost about 1% of a small model's throughput).

    Label sets are never removed from these metrics, so a cached child stays the live one.
    """
    key = (model, version, method, code, transport)
    found = _call_metrics_cache.get(key)
    if found is None:
        found = (
            metrics.REQUESTS.labels(model, version, method, code.name, transport),
            metrics.REQUEST_DURATION.labels(model, version, method, transport),
        )
        _call_metrics_cache[key] = found
    return found


def record_call(
    call: CallInfo, full_method: str, code: grpc.StatusCode, message: str, elapsed: float
) -> None:
    """Metrics, statistics and the access log line of one finished call, whatever its transport."""
    requests, duration = _call_metrics(call.model, call.version, call.method, code, call.transport)
    requests.inc()
    if call.stats is not None:
        call.stats.answered(code is grpc.StatusCode.OK, elapsed, call.times)
    if code is not grpc.StatusCode.OK:
        metrics.FAILURES.labels(call.model, call.version, code.name.lower()).inc()
    duration.observe(elapsed)
    fields = {
        "request_id": call.request_id,
        "transport": call.transport,
        "method": full_method,
        "model": call.model,
        "version": call.version,
        "images": call.images,
        "code": code.name,
        "duration_ms": round(elapsed * 1000, 3),
    }
    if message and code is not grpc.StatusCode.INTERNAL:
        fields["error"] = message
    log.log(
        logging.WARNING if code is grpc.StatusCode.INTERNAL else logging.INFO, "rpc", extra={"fields": fields}
    )
