"""The dynamic batcher: merges concurrent requests into onnxruntime runs, and nothing else.

Each model version has one. A request is a dict of input arrays sharing a leading batch axis;
it counts by its rows ("images") and may be split across runs. Requests wait in one FIFO queue:
- a full queue refuses a request at once (`QueueFull`), it never waits for room;
- a request whose deadline passed before its run starts fails with `DeadlineExceeded`;
- a cancelled request leaves the queue and its rows are never run;
- an error in a run fails exactly the requests that had rows in that run.
`instances` workers each take up to `max_batch_size` rows from the head of the queue, waiting at
most `max_queue_delay` seconds (from the oldest request's arrival) for more to come, and run the
blocking function in a thread pool. `max_batch_size: 1` is "batching off" on the same path;
`max_batch_size: 0` is for models without a batch axis: each request is one run, as it is.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from service.errors import DeadlineExceeded, ModelNotReady, QueueFull

Feeds = dict[str, np.ndarray]
RunFunction = Callable[[Feeds], Sequence[np.ndarray]]


@dataclass(frozen=True)
class BatchingOptions:
    max_batch_size: int = 64
    max_queue_delay: float = 0.0
    max_queue_size: int = 1024
    instances: int = 1


@dataclass(frozen=True)
class RunReport:
    """What one run did, for metrics: rows, requests in it, seconds in the run."""

    rows: int
    requests: int
    seconds: float


@dataclass(frozen=True)
class QueueReport:
    """One request's rows left the queue after `seconds` of waiting."""

    seconds: float


@dataclass(eq=False)
class _Request:
    feeds: Feeds
    rows: int
    deadline: float | None  # loop.time() based
    enqueued: float
    future: asyncio.Future[list[np.ndarray]]
    taken: int = 0  # rows handed to runs so far
    parts: dict[int, list[np.ndarray]] = field(default_factory=dict)  # start row -> outputs
    done_rows: int = 0

    def finished(self) -> bool:
        return self.future.done()


@dataclass(frozen=True)
class _Slice:
    request: _Request
    start: int
    stop: int


class DynamicBatcher:
    """`await submit(feeds)` returns the outputs for those rows, as if run alone."""

    def __init__(
        self,
        run: RunFunction,
        options: BatchingOptions,
        on_run: Callable[[RunReport], None] | None = None,
        on_dequeue: Callable[[QueueReport], None] | None = None,
    ) -> None:
        self._run = run
        self.options = options
        self._on_run = on_run or (lambda report: None)
        self._on_dequeue = on_dequeue or (lambda report: None)
        self._queue: deque[_Request] = deque()
        self._pending_rows = 0
        self._arrived = asyncio.Event()
        self._pool = ThreadPoolExecutor(max_workers=options.instances, thread_name_prefix="onnxruntime")
        self._workers: list[asyncio.Task[None]] = []

    @property
    def pending_rows(self) -> int:
        """Rows waiting in the queue (not yet handed to a run)."""
        return self._pending_rows

    def start(self) -> None:
        if not self._workers:
            self._workers = [asyncio.create_task(self._work()) for _ in range(self.options.instances)]

    async def close(self) -> None:
        """Stop the workers; requests still queued fail as if the model were unloaded."""
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []
        while self._queue:
            request = self._queue.popleft()
            if not request.finished():
                request.future.set_exception(ModelNotReady("the model version was unloaded"))
        self._pending_rows = 0
        self._pool.shutdown(wait=False)

    async def submit(self, feeds: Feeds, deadline: float | None = None) -> list[np.ndarray]:
        """Queue the rows of `feeds` (equal leading dimension) and wait for their outputs."""
        rows = 1 if self.options.max_batch_size == 0 else _rows(feeds)
        if rows > self.options.max_queue_size - self._pending_rows:
            raise QueueFull(
                f"queue full: {self._pending_rows} of {self.options.max_queue_size} rows waiting, "
                f"this request has {rows}"
            )
        loop = asyncio.get_running_loop()
        request = _Request(feeds, rows, deadline, loop.time(), loop.create_future())
        self._queue.append(request)
        self._pending_rows += rows
        self._arrived.set()
        self.start()
        try:
            return await request.future
        finally:
            if not request.future.done():  # we were cancelled: leave the queue, run nothing more
                request.future.cancel()
            self._forget(request)

    def _forget(self, request: _Request) -> None:
        """Drop a finished request's rows that never reached a run."""
        if request in self._queue:
            self._queue.remove(request)
            self._pending_rows -= request.rows - request.taken

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            await self._wait_for_fill(loop)
            slices = self._take(loop)
            if slices:
                await self._execute(loop, slices)

    async def _wait_for_fill(self, loop: asyncio.AbstractEventLoop) -> None:
        """Give more rows up to max_queue_delay (from the oldest arrival) to join the batch."""
        while self._queue and self._pending_rows < max(self.options.max_batch_size, 1):
            remaining = self._queue[0].enqueued + self.options.max_queue_delay - loop.time()
            if remaining <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:  # not the builtin TimeoutError on Python 3.10
                return

    def _take(self, loop: asyncio.AbstractEventLoop) -> list[_Slice]:
        """Up to max_batch_size rows from the head, skipping finished and expired requests."""
        slices: list[_Slice] = []
        room = max(self.options.max_batch_size, 1)
        now = loop.time()
        while self._queue and room > 0:
            request = self._queue[0]
            if request.finished():
                self._forget(request)
                continue
            if request.deadline is not None and now >= request.deadline:
                self._forget(request)
                request.future.set_exception(DeadlineExceeded("deadline passed while the request was queued"))
                continue
            count = min(room, request.rows - request.taken)
            slices.append(_Slice(request, request.taken, request.taken + count))
            if request.taken == 0:
                self._on_dequeue(QueueReport(now - request.enqueued))
            request.taken += count
            self._pending_rows -= count
            room -= count
            if request.taken == request.rows:
                self._queue.popleft()
        return slices

    async def _execute(self, loop: asyncio.AbstractEventLoop, slices: list[_Slice]) -> None:
        feeds = _merge(slices)
        started = time.perf_counter()
        try:
            outputs = await loop.run_in_executor(self._pool, self._run, feeds)
        except Exception as exc:
            for piece in slices:
                if not piece.request.finished():
                    piece.request.future.set_exception(exc)
                self._forget(piece.request)
            return
        finally:
            rows = sum(piece.stop - piece.start for piece in slices)
            self._on_run(RunReport(rows, len(slices), time.perf_counter() - started))
        whole = slices[0]
        if len(slices) == 1 and whole.start == 0 and whole.stop == whole.request.rows:
            if not whole.request.finished():
                whole.request.future.set_result(list(outputs))
            return
        offset = 0
        for piece in slices:
            count = piece.stop - piece.start
            request = piece.request
            if not request.finished():
                request.parts[piece.start] = [output[offset : offset + count] for output in outputs]
                request.done_rows += count
                if request.done_rows == request.rows:
                    request.future.set_result(_assemble(request))
            offset += count


def _rows(feeds: Feeds) -> int:
    counts = {array.shape[0] if array.ndim else -1 for array in feeds.values()}
    if len(counts) != 1 or -1 in counts:
        shapes = [a.shape for a in feeds.values()]
        raise ValueError(f"inputs must share a leading batch axis, got shapes {shapes}")
    (rows,) = counts
    return rows


def _merge(slices: list[_Slice]) -> Feeds:
    """One run's inputs; a single whole request goes through without a copy."""
    first = slices[0]
    if len(slices) == 1 and first.start == 0 and first.stop == first.request.rows:
        return first.request.feeds
    names = first.request.feeds.keys()
    return {
        name: np.concatenate([piece.request.feeds[name][piece.start : piece.stop] for piece in slices])
        for name in names
    }


def _assemble(request: _Request) -> list[np.ndarray]:
    starts = sorted(request.parts)
    if len(starts) == 1:
        return request.parts[starts[0]]
    per_output = zip(*(request.parts[start] for start in starts), strict=True)
    return [np.concatenate(pieces) for pieces in per_output]
