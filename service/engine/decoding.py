"""The decode pool: a fixed number of threads with a bounded queue for the work the cost rule keeps
off the event loop (decoding and pre-processing images, encoding PNGs), and a process for the work
that holds the GIL throughout (parsing large JSON bodies), which a thread would not keep off it.

Work that cannot even queue is refused at once (`QueueFull`: RESOURCE_EXHAUSTED, HTTP 503, counted
in `convserve_decode_pool_refused`), so a burst of expensive requests costs the server a bounded
number of threads and buffers. Each piece of work runs with a `Stop`: the codecs call `checkpoint()`
between images, so work whose client's deadline passed, or whose call was cancelled, stops there
instead of decoding the rest for nobody.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TypeVar

from service.codecs.cost import Stop, Work, stopping
from service.errors import QueueFull
from service.observability import metrics

R = TypeVar("R")

log = logging.getLogger(__name__)

#: Threads by default: one per usable CPU, at most this many.
MAX_DEFAULT_THREADS = 8


def default_threads() -> int:
    return max(1, min(MAX_DEFAULT_THREADS, len(os.sched_getaffinity(0))))


class DecodePool:
    """`await pool.run(work, step, deadline)`: `step` in one of `threads` threads, or in one of
    `processes` processes when `work.in_process` (0: threads only); `queue` more may wait."""

    def __init__(self, threads: int = 0, queue: int = 64, processes: int = 1) -> None:
        self.threads = threads or default_threads()
        self.capacity = self.threads + processes + queue
        self._executor = ThreadPoolExecutor(self.threads, thread_name_prefix="convserve-decode")
        self._process_count = processes
        self._processes = self._start_processes()
        self._lock = threading.Lock()
        self._pending = 0

    @property
    def pending(self) -> int:
        return self._pending

    async def run(self, work: Work, step: Callable[[], R], deadline: float | None = None) -> R:
        """`step()` in the pool; `deadline` on the event loop's clock (None: none). Cancelling the
        caller stops the step at its next checkpoint (or before it starts). In a process, `step`
        must pickle (a module's function, or a partial of one) and runs to its end."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._pending >= self.capacity:
                metrics.DECODE_POOL_REFUSED.inc()
                raise QueueFull(
                    f"all {self.threads} decode threads are busy and {self.capacity - self.threads} "
                    "requests wait for them (decode_queue); retry later"
                )
            self._pending += 1
        metrics.DECODE_POOL_PENDING.inc()
        stop = Stop(None if deadline is None else time.monotonic() + (deadline - loop.time()))
        try:
            future = self._submit(work, stop, step)
        except BaseException:
            self._release()
            raise
        future.add_done_callback(lambda _: self._release())  # when it ran, failed or never started
        try:
            return await asyncio.wrap_future(future)
        except BrokenProcessPool:  # its process died (killed, out of memory): a new one for the next
            self._processes = self._start_processes()
            raise
        except asyncio.CancelledError:
            stop.cancelled.set()  # a running step stops at its next checkpoint
            future.cancel()  # one still waiting never starts
            raise

    def _start_processes(self) -> ProcessPoolExecutor | None:
        """The pool's processes, started now rather than on the first large request; none when the
        platform cannot start them (e.g. no /dev/shm), and then such work runs in the threads."""
        if not self._process_count:
            return None
        try:  # spawn, not fork: this process has gRPC's threads
            processes = ProcessPoolExecutor(
                self._process_count, mp_context=multiprocessing.get_context("spawn")
            )
            processes.submit(int)
        except OSError as exc:
            log.warning("decode processes unavailable (%s): JSON bodies are parsed in threads", exc)
            return None
        return processes

    def _submit(self, work: Work, stop: Stop, step: Callable[[], R]) -> Future[R]:
        if work.in_process and self._processes is not None:
            stop.check()
            try:
                return self._processes.submit(step)
            except BrokenProcessPool:  # its process died while idle
                self._processes = self._start_processes()
                if self._processes is not None:
                    return self._processes.submit(step)
        executor: Executor = self._executor
        return executor.submit(contextvars.copy_context().run, stopping, stop, step)

    def _release(self) -> None:
        with self._lock:
            self._pending -= 1
        metrics.DECODE_POOL_PENDING.dec()

    def close(self) -> None:
        """Stop both pools. The processes are waited for: left running, their manager thread can close
        its wake-up pipe while the interpreter's exit hook writes to it (CPython 3.11 prints an
        ignored OSError from `threading` at exit). They are idle or finishing one bounded decode."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self._processes is not None:
            self._processes.shutdown(wait=True, cancel_futures=True)
