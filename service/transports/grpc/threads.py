"""gRPC's own threads below the event loop, for a process that has one core.

grpc.aio serves from the event loop, but grpc creates threads of its own: a completion-queue poller
and the event engine's network threads. On one core they share the CPU with the loop, and at
every network event one of them preempts it. Run at the lowest priority (nice 19), they still
get the core whenever the loop waits, and the loop is no longer cut short at each event.
Measured with the server pinned to one core, `lenet5` through KServe at concurrency 64, five
interleaved pairs: 952 -> 1,035 requests/s on average; the no-op server gains at least as much.
grpc starts these threads when its first server is created, and neither binding, starting nor
serving starts more (checked with grpcio 1.85), so wrapping the creation is enough.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

log = logging.getLogger(__name__)

#: The lowest priority there is (nice values run from -20 to 19).
LOW_PRIORITY_NICE = 19


def thread_ids() -> set[int]:
    """The ids of this process's threads (Linux); empty where /proc is not there."""
    try:
        return {int(name) for name in os.listdir("/proc/self/task")}
    except OSError:
        return set()


def lower_priority(ids: set[int], nice: int = LOW_PRIORITY_NICE) -> int:
    """Give threads `nice` (on Linux setpriority takes a thread id); returns how many were changed."""
    changed = 0
    for thread_id in ids:
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            os.setpriority(os.PRIO_PROCESS, thread_id, nice)
            changed += 1
    return changed


@contextlib.contextmanager
def threads_started_at_low_priority(enabled: bool) -> Iterator[None]:
    """Threads that the block starts (e.g. creating the first grpc.aio server) run at low priority.

    Threads that they start later inherit it. When grpc's threads already existed (another
    server or channel came first in this process), nothing new starts and nothing changes.
    """
    before = thread_ids()
    yield
    if not enabled:
        return
    changed = lower_priority(thread_ids() - before)
    if changed:
        log.info("gRPC's %d thread(s) run at nice %d, below the event loop", changed, LOW_PRIORITY_NICE)
    else:
        log.debug("no thread started (gRPC's threads existed already): priorities unchanged")
