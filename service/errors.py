"""Domain errors and the one table that maps each to its gRPC status code and HTTP status.

Code anywhere in the server raises these; the call observation (service/dataplane/calls.py)
turns them into the transport's status with the error's message. Any other exception is a bug:
the client gets INTERNAL (HTTP 500) with a generic message and the traceback goes to the log.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import grpc


class ConvserveError(Exception):
    """Base of the errors a client may see, with their message."""


class InvalidArgument(ConvserveError):
    """The request is malformed: bad image bytes, shapes, options."""


class ModelNotFound(ConvserveError):
    """No such model or version in the repository."""


class ModelNotReady(ConvserveError):
    """The model exists but cannot answer now (loading, failed, unloaded)."""


class QueueFull(ConvserveError):
    """The model's queue has no room for the request; retry later (with backoff)."""


class BatchFailed(ConvserveError):
    """The request's batch failed in both halves, so which requests cannot run is unknown; retry."""


class DeadlineExceeded(ConvserveError):
    """The request's deadline passed before its work could start."""


class Unauthenticated(ConvserveError):
    """No bearer token, or one the server does not know."""


class PermissionDenied(ConvserveError):
    """A known caller asked for something it may not do (repository control, a cross-site request)."""


class Cancelled(ConvserveError):
    """The client went away (hung up, or cancelled the call) before the answer was ready."""


@dataclass(frozen=True)
class Status:
    """How one kind of outcome goes out: its gRPC code and its HTTP status."""

    code: grpc.StatusCode
    http: int


OK = Status(grpc.StatusCode.OK, 200)
INTERNAL = Status(grpc.StatusCode.INTERNAL, 500)

#: The one error table. HTTP statuses as the Open Inference Protocol's REST binding expects them; a
#: full queue is 503 over HTTP (with Retry-After), as Triton answers it, and RESOURCE_EXHAUSTED on gRPC.
STATUSES: dict[type[ConvserveError], Status] = {
    InvalidArgument: Status(grpc.StatusCode.INVALID_ARGUMENT, 400),
    ModelNotFound: Status(grpc.StatusCode.NOT_FOUND, 404),
    ModelNotReady: Status(grpc.StatusCode.UNAVAILABLE, 503),
    QueueFull: Status(grpc.StatusCode.RESOURCE_EXHAUSTED, 503),
    BatchFailed: Status(grpc.StatusCode.UNAVAILABLE, 503),
    DeadlineExceeded: Status(grpc.StatusCode.DEADLINE_EXCEEDED, 504),
    Unauthenticated: Status(grpc.StatusCode.UNAUTHENTICATED, 401),
    PermissionDenied: Status(grpc.StatusCode.PERMISSION_DENIED, 403),
    Cancelled: Status(grpc.StatusCode.CANCELLED, 499),
}
#: gRPC code -> HTTP status, for outcomes known only by their code (e.g. a gRPC abort).
HTTP_STATUS: dict[grpc.StatusCode, int] = {s.code: s.http for s in STATUSES.values()} | {
    OK.code: OK.http,
    grpc.StatusCode.UNAVAILABLE: 503,
    INTERNAL.code: INTERNAL.http,
}

INTERNAL_MESSAGE = "internal error; the server log has the details"

#: The most characters of one request-derived value an error message or log line shows.
ECHO_CHARS = 64
#: The most items of a request-derived list shown (then a count of the rest).
ECHO_ITEMS = 8
#: The most characters of any error message a client or the access log gets, whatever it was built
#: from (with the log line's other fields, a line stays under 1 KiB).
MAX_MESSAGE_CHARS = 480


def clip(value: object, limit: int = ECHO_CHARS) -> str:
    """`repr(value)` of a request-derived value, cut to `limit` characters ("..." and the length
    after a cut), so that no client can make an error message or a log line as long as its request."""
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]!r}... ({len(value)} characters)"
    if isinstance(value, bytes | bytearray) and len(value) > limit:
        return f"{bytes(value[:limit])!r}... ({len(value)} bytes)"
    if isinstance(value, list | tuple) and len(value) > ECHO_ITEMS:
        return clip_list(value)
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}..."


def clip_list(values: Sequence[object] | Iterable[object], items: int = ECHO_ITEMS) -> str:
    """A request-derived list as its first `items` values (each clipped) and how many there are."""
    values = list(values) if not isinstance(values, Sequence) else values
    shown = ", ".join(clip(v) for v in values[:items])
    if len(values) <= items:
        return f"[{shown}]"
    return f"[{shown}, ...] ({len(values)} items)"


def clip_message(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """A whole error message cut to `limit` characters: the last guard before a client or a log."""
    return message if len(message) <= limit else f"{message[: limit - 30]}... ({len(message)} characters)"


def status_of(error: BaseException) -> Status:
    """The status an exception goes out with: its class's (or a base's) entry, else INTERNAL."""
    for cls in type(error).__mro__:
        found = STATUSES.get(cls)  # type: ignore[arg-type]
        if found is not None:
            return found
    return INTERNAL
