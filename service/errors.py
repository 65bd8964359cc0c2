"""Domain errors and the one table that maps them to gRPC status codes.

Code anywhere in the server raises these; the interceptor turns them into a status with the
error's message. Any other exception is a bug: the client gets INTERNAL with a generic message
and the traceback goes to the log.
"""

from __future__ import annotations

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


STATUS_CODES: dict[type[ConvserveError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    ModelNotFound: grpc.StatusCode.NOT_FOUND,
    ModelNotReady: grpc.StatusCode.UNAVAILABLE,
    QueueFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    BatchFailed: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
}

INTERNAL_MESSAGE = "internal error; the server log has the details"


def status_for(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC code and client-facing message for an exception."""
    for cls in type(error).__mro__:
        if cls in STATUS_CODES:
            return STATUS_CODES[cls], str(error)
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE
