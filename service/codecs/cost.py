"""Where a codec's work runs: on the event loop, in a thread or in another process. One rule for
every request path.

Handing work to a thread and back costs about 80 µs on the event loop (measured with
`asyncio.to_thread` on a 2-core machine), so work estimated to take less runs inline and larger
work goes to the decode pool (service/engine/decoding.py), where it cannot delay other requests:
to its threads, or, for work that holds the GIL throughout (parsing JSON), to its process. Each
codec's estimate is linear in what it handles; the rates below reproduce the measured break-even
points (about 64 KiB of raw tensor data, 16 KiB of compressed image, and no PNG encoding at all).
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TypeVar

from service.errors import Cancelled, DeadlineExceeded

R = TypeVar("R")

#: Seconds a hand-off to a thread costs the event loop, and so the most work done inline.
THREAD_HANDOFF_SECONDS = 80e-6


class Codec(enum.Enum):
    """What a stage does, with its estimated seconds per unit of `Work.units`."""

    NONE = 0.0  # a few attribute reads: always inline
    TENSOR = 1.2e-9  # KServe tensors, per byte: raw data is wrapped, BYTES and typed values are parsed
    IMAGE = 5e-9  # PNG / JPEG / BMP decoding and pre-processing, per compressed byte
    PIXELS = 4e-9  # decoding and pre-processing, per pixel the images' headers declare
    JSON = 1e-8  # json.loads of a request body, and its numbers to an array, per byte (holds the GIL)
    PNG = 3e-7  # PNG encoding, per pixel


@dataclass(frozen=True, slots=True)
class Work:
    codec: Codec
    units: int = 0

    @property
    def seconds(self) -> float:
        return self.codec.value * self.units

    @property
    def inline(self) -> bool:
        """Whether this work is cheaper on the event loop than a hand-off to a thread."""
        return self.seconds <= THREAD_HANDOFF_SECONDS

    @property
    def in_process(self) -> bool:
        """Whether this work, too large to run inline, must run in another process: it holds the GIL
        for its whole run (json.loads, numpy over nested lists), so a thread would stall the loop."""
        return self.codec in HOLDS_THE_GIL and not self.inline


INLINE = Work(Codec.NONE)
#: Codecs whose work runs in C without releasing the GIL (Pillow and numpy's bulk work release it).
HOLDS_THE_GIL = frozenset({Codec.JSON})


@dataclass
class Stop:
    """When work handed to a thread should give up: the client's deadline (`time.monotonic()`
    seconds; None: none) passed, or the call was cancelled (`cancelled` set from the event loop)."""

    deadline: float | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)

    def check(self) -> None:
        if self.cancelled.is_set():
            raise Cancelled("the call was cancelled while its inputs were being decoded")
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise DeadlineExceeded("the deadline passed while the request's inputs were being decoded")


_stop: ContextVar[Stop | None] = ContextVar("convserve_stop", default=None)


def checkpoint() -> None:
    """Between two pieces of a request's work (e.g. images): stop here when the work's `Stop` says so.

    Outside work run with a `Stop` (`stopping`), it does nothing."""
    stop = _stop.get()
    if stop is not None:
        stop.check()


def stopping(stop: Stop, step: Callable[[], R]) -> R:
    """Run `step` with `stop` as what `checkpoint()` consults (in the thread that runs it)."""
    stop.check()
    token = _stop.set(stop)
    try:
        return step()
    finally:
        _stop.reset(token)
