"""What every servicer does the same way: find the model version, read the deadline."""

from __future__ import annotations

import asyncio

import grpc

from service.errors import ModelNotFound
from service.observability.metrics import UNKNOWN_MODEL
from service.observability.statistics import RequestTimes
from service.repository import ModelRepository, ModelVersion
from service.transports.calls import current_call

#: Seconds a request gets when its client set no deadline (`default_timeout_seconds`); 0: none.
#: One server per process: `ConvserveServer.start()` sets it from the settings.
_default_timeout_seconds = 0.0


def set_default_timeout(seconds: float) -> None:
    """The deadline of requests without one, from now on (0: none); the server calls it at start."""
    global _default_timeout_seconds
    if seconds < 0:
        raise ValueError(f"default timeout must be >= 0, got {seconds}")
    _default_timeout_seconds = seconds


def resolve(repository: ModelRepository, model: str, version: str, inference: bool = True) -> ModelVersion:
    """The version that answers; the call is labelled with it (or "unknown", never the client's string).

    Inference calls also count in the version's statistics (success, failure, latency), with the
    stage times they gather in `call.times`.
    """
    call = current_call()
    try:
        served = repository.get(model, version)
    except ModelNotFound:
        call.model = UNKNOWN_MODEL
        raise
    call.model, call.version = served.model, served.version
    if inference:
        call.stats = served.stats
        call.times = RequestTimes()
    return served


def request_times() -> RequestTimes:
    """The running inference call's stage times (a throwaway record outside a call, in unit tests)."""
    return current_call().times or RequestTimes()


def default_deadline() -> float | None:
    """The deadline, on the event loop's clock, of a request whose client set none (None: no default)."""
    if _default_timeout_seconds <= 0:
        return None
    return asyncio.get_running_loop().time() + _default_timeout_seconds


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The client's deadline on the event loop's clock; without one, the server's default (or None)."""
    remaining = context.time_remaining()
    if remaining is None:
        return default_deadline()
    return asyncio.get_running_loop().time() + remaining
