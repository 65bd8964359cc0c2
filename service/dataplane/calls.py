"""The one call observation every transport goes through: a request id, the error table, metrics,
statistics and the access log, recorded once per call.

A transport opens a `CallObserver` around each call and, when the call fails, hands it the
exception (`failed`) to learn the status and message to answer with. The data plane fills in the
model and version that answered (`current_call()`), so the log line and the metrics carry them
without the transport knowing.
"""

from __future__ import annotations

import itertools
import logging
import re
import secrets
import time
from contextvars import ContextVar, Token
from dataclasses import dataclass
from typing import Any

import grpc

from service.errors import HTTP_STATUS, INTERNAL, INTERNAL_MESSAGE, OK, Status, clip_message, status_of
from service.observability import metrics
from service.observability.logs import ACCESS_LOG, ACCESS_LOGGER
from service.observability.statistics import RequestTimes, VersionStatistics

log = logging.getLogger(ACCESS_LOGGER)

REQUEST_ID_KEY = "x-request-id"
_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
# Fresh request ids: a random prefix per process and a counter, unique without a uuid4 per call
# (os.urandom and a UUID object cost about 1% of a small model's throughput).
_ID_PREFIX = secrets.token_hex(8)
_id_counter = itertools.count()


@dataclass(slots=True)
class CallInfo:
    request_id: str
    method: str
    model: str = ""
    version: str = ""
    images: int = 0
    transport: str = "grpc"
    stats: VersionStatistics | None = None  # of the version that answered, once known
    times: RequestTimes | None = None  # an inference request's stage times, committed when it answers


@dataclass(frozen=True)
class Failure:
    """How a failed call is answered: its status (gRPC code and HTTP status) and message."""

    status: Status
    message: str


_current: ContextVar[CallInfo | None] = ContextVar("convserve_call", default=None)


def current_call() -> CallInfo:
    """The running call's record; a throwaway one outside a call (e.g. in unit tests)."""
    call = _current.get()
    return call if call is not None else CallInfo(request_id="", method="")


def new_request_id(offered: str | None) -> str:
    """The client's request id when it is a sane one, else a fresh one."""
    if offered and _VALID_REQUEST_ID.fullmatch(offered):
        return offered
    return f"{_ID_PREFIX}{next(_id_counter):016x}"  # 32 hex digits, as a uuid4


class CallObserver:
    """One call from start to end: `with CallObserver(call, label) as observer:` around its work.

    Inside, the call is `current_call()`. The outcome is OK unless the transport reports one:
    `failed(exc)` maps an exception through the error table (and logs a traceback for a bug),
    `ended(code, message)` records an outcome known only by its gRPC code (a cancellation, a gRPC
    abort, a route's own 503). On exit the call is counted, timed, logged and, for an inference
    call, committed to its version's statistics. A plain class: it runs for every call.
    """

    __slots__ = ("_started", "_token", "call", "code", "label", "message", "quiet")

    def __init__(self, call: CallInfo, label: str, quiet: bool = False) -> None:
        self.call = call
        self.label = label  # the full gRPC method, or "GET /v2/..."
        self.quiet = quiet  # probes and tooling: no log line, no metrics
        self.code = grpc.StatusCode.OK
        self.message = ""
        self._started = 0.0
        self._token: Token[CallInfo | None] | None = None

    def __enter__(self) -> CallObserver:
        self._token = _current.set(self.call)
        self._started = time.perf_counter()
        return self

    def failed(self, error: BaseException) -> Failure:
        """The status and message for `error`; an unexpected one is logged with its traceback."""
        status = status_of(error)
        if status is INTERNAL:
            log.error(
                "unhandled error in %s",
                self.label,
                exc_info=error,
                extra={"fields": {"request_id": self.call.request_id}},
            )
            message = INTERNAL_MESSAGE
        else:
            message = clip_message(str(error))
        self.code, self.message = status.code, message
        return Failure(status, message)

    def ended(self, code: grpc.StatusCode, message: str) -> Failure:
        """Record an outcome known by its gRPC code only."""
        message = clip_message(message)
        self.code, self.message = code, message
        return Failure(Status(code, HTTP_STATUS.get(code, 500)), message)

    @property
    def ok(self) -> bool:
        return self.code is OK.code

    def __exit__(self, *_: object) -> None:
        elapsed = time.perf_counter() - self._started
        if self._token is not None:
            _current.reset(self._token)
        if not self.quiet:
            record_call(self.call, self.label, self.code, self.message, elapsed)


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


def record_call(call: CallInfo, label: str, code: grpc.StatusCode, message: str, elapsed: float) -> None:
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
        "method": label,
        "model": call.model,
        "version": call.version,
        "images": call.images,
        "code": code.name,
        "duration_ms": round(elapsed * 1000, 3),
    }
    if message and code is not grpc.StatusCode.INTERNAL:
        fields["error"] = clip_message(message)  # the access log's error field is capped too
    ACCESS_LOG.write(logging.WARNING if code is grpc.StatusCode.INTERNAL else logging.INFO, "rpc", fields)
