"""Where a codec's work runs: on the event loop, or in a thread. One rule for every request path.

Handing work to a thread and back costs about 80 µs on the event loop (measured with
`asyncio.to_thread` on a 2-core machine), so work estimated to take less runs inline and larger
work goes to a thread, where it cannot delay other requests. Each codec's estimate is linear in
what it handles; the rates below reproduce the measured break-even points (about 64 KiB of raw
tensor data, 16 KiB of compressed image, and no PNG encoding at all).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

#: Seconds a hand-off to a thread costs the event loop, and so the most work done inline.
THREAD_HANDOFF_SECONDS = 80e-6


class Codec(enum.Enum):
    """What a stage does, with its estimated seconds per unit of `Work.units`."""

    NONE = 0.0  # a few attribute reads: always inline
    TENSOR = 1.2e-9  # KServe tensors, per byte: raw data is wrapped, BYTES and typed values are parsed
    IMAGE = 5e-9  # PNG / JPEG / BMP decoding and pre-processing, per compressed byte
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


INLINE = Work(Codec.NONE)
