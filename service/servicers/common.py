"""What every servicer does the same way: find the model version, read the deadline."""

from __future__ import annotations

import asyncio

import grpc

from service.errors import ModelNotFound
from service.interceptors import current_call
from service.metrics import UNKNOWN_MODEL
from service.repository import ModelRepository, ModelVersion


def resolve(repository: ModelRepository, model: str, version: str, inference: bool = True) -> ModelVersion:
    """The version that answers; the call is labelled with it (or "unknown", never the client's string).

    Inference calls also count in the version's statistics (success, failure, latency).
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
    return served


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The client's deadline on the event loop's clock, or None when it set none."""
    remaining = context.time_remaining()
    if remaining is None:
        return None
    return asyncio.get_running_loop().time() + remaining
