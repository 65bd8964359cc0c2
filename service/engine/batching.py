"""The dynamic batcher: merges concurrent requests into onnxruntime runs, and nothing else.

Each model version has one. A request is a dict of input arrays sharing a leading batch axis;
it counts by its rows ("images") and may be split across runs. Requests wait in one FIFO queue:
- a full queue refuses a request at once (`QueueFull`), it never waits for room;
- a request whose deadline passed before its run starts fails with `DeadlineExceeded`;
- a cancelled request leaves the queue and its rows are never run;
- each request is checked (`check`, the model kind's rules) before it joins the queue, so a
  request that cannot run is refused alone and never reaches a batch;
- a run of several requests that still fails is split and retried (see `_isolate`), so that only
  the requests that cannot run fail and their neighbours get their answers.
`instances` workers each take up to `max_batch_size` rows from the head of the queue, waiting at
most `max_queue_delay` seconds (from the oldest request's arrival) for more to come, and run the
blocking function in a thread pool. `max_batch_size: 1` is "batching off" on the same path;
`max_batch_size: 0` is for models without a batch axis: each request is one run, as it is.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import numpy as np

from service.errors import BatchFailed, DeadlineExceeded, InvalidArgument, ModelNotReady, QueueFull

log = logging.getLogger(__name__)
Feeds = dict[str, np.ndarray]
RunFunction = Callable[[Feeds], Sequence[np.ndarray]]
CheckFunction = Callable[[Feeds], None]


class Timing(Protocol):
    """Where the batcher writes one request's seconds in the queue and in runs (its statistics)."""

    queue: float
    infer: float


@dataclass(frozen=True)
class BatchingOptions:
    max_batch_size: int = 64
    max_queue_delay: float = 0.0
    max_queue_size: int = 1024
    instances: int = 1
    inline: bool = False  # run on the event loop, not in a thread: for a process with one core


class RunReport(NamedTuple):
    """What one run did, for metrics: rows, requests in it, seconds in the run."""

    rows: int
    requests: int
    seconds: float


@dataclass(frozen=True)
class IsolationReport:
    """A failed run of several requests was split: `retries` runs more; `alone` requests failed on
    their own (they cannot run), `with_batch` failed with their batch (both halves failed)."""

    retries: int
    alone: int
    with_batch: int


class QueueReport(NamedTuple):
    """One request's rows left the queue after `seconds` of waiting."""

    seconds: float


class _Request:
    """One submitted request in the queue (a plain class with slots: one is made per request)."""

    __slots__ = (
        "deadline", "done_rows", "enqueued", "feeds", "future", "parts",
        "rows", "signature", "taken", "timing",
    )  # fmt: skip

    def __init__(
        self,
        feeds: Feeds,
        rows: int,
        signature: object,  # only equal signatures share a run
        deadline: float | None,  # loop.time() based
        enqueued: float,
        future: asyncio.Future[list[np.ndarray]],
        timing: Timing | None = None,
    ) -> None:
        self.feeds = feeds
        self.rows = rows
        self.signature = signature
        self.deadline = deadline
        self.enqueued = enqueued
        self.future = future
        self.timing = timing
        self.taken = 0  # rows handed to runs so far
        self.parts: dict[int, list[np.ndarray]] = {}  # start row -> outputs
        self.done_rows = 0

    def finished(self) -> bool:
        return self.future.done()


class _Slice(NamedTuple):
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
        check: CheckFunction | None = None,
        on_isolation: Callable[[IsolationReport], None] | None = None,
    ) -> None:
        self._run = run
        self.options = options
        self._on_run = on_run or (lambda report: None)
        self._on_dequeue = on_dequeue or (lambda report: None)
        self._check = check
        self._on_isolation = on_isolation or (lambda report: None)
        self._queue: deque[_Request] = deque()
        self._pending_rows = 0
        self._arrived = asyncio.Event()
        self._pool = ThreadPoolExecutor(max_workers=options.instances, thread_name_prefix="onnxruntime")
        self._workers: list[asyncio.Task[None]] = []
        self._workers_missing = True  # set again when a worker task ends
        # requests with rows in a run right now, and in how many (with instances > 1, a request's
        # rows can be in two runs at once)
        self._running: Counter[_Request] = Counter()
        self._closed = False

    @property
    def pending_rows(self) -> int:
        """Rows waiting in the queue (not yet handed to a run)."""
        return self._pending_rows

    def start(self) -> None:
        """Start (or restart) the workers; idempotent."""
        self._workers = [w for w in self._workers if not w.done()]
        missing = self.options.instances - len(self._workers)
        for _ in range(missing):
            worker = asyncio.create_task(self._work())
            worker.add_done_callback(self._worker_ended)
            self._workers.append(worker)
        self._workers_missing = False

    def _worker_ended(self, _: asyncio.Task[None]) -> None:
        self._workers_missing = True

    async def close(self) -> None:
        """Stop the workers; requests queued or running fail as if the model were unloaded."""
        self._closed = True
        doomed = [*self._queue, *self._running]  # before cancelling: a cancelled run forgets its own
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []
        unloaded = ModelNotReady("the model version was unloaded")
        for request in doomed:
            if not request.finished():
                request.future.set_exception(unloaded)
        self._queue.clear()
        self._running.clear()
        self._pending_rows = 0
        self._pool.shutdown(wait=False)

    def admit(self, rows: int) -> None:
        """Refuse at once what cannot be queued now; the data plane calls it before decoding, submit again."""
        if self._closed:
            raise ModelNotReady("the model version was unloaded")
        limit = self.options.max_queue_size
        if rows > limit:
            raise InvalidArgument(
                f"request has {rows} rows (images); this model queues at most {limit}: split it"
            )
        if rows > limit - self._pending_rows:
            raise QueueFull(
                f"queue full: {self._pending_rows} of {limit} rows waiting, this request has {rows}"
            )

    async def submit(
        self, feeds: Feeds, deadline: float | None = None, timing: Timing | None = None
    ) -> list[np.ndarray]:
        """Queue the rows of `feeds` (equal leading dimension) and wait for their outputs.

        `timing`, when given, receives the request's seconds in the queue and in runs.
        """
        rows = 1 if self.options.max_batch_size == 0 else _rows(feeds)
        self.admit(rows)
        if self._check is not None:
            self._check(feeds)
        loop = asyncio.get_running_loop()
        if self._may_run_now(loop, rows):
            return self._run_now(feeds, rows, deadline, timing, loop)
        future = loop.create_future()
        request = _Request(feeds, rows, _signature(feeds), deadline, loop.time(), future, timing)
        self._queue.append(request)
        self._pending_rows += rows
        self._arrived.set()
        if self._workers_missing:
            self.start()
        try:
            return await request.future
        finally:
            if not request.future.done():  # we were cancelled: leave the queue, run nothing more
                request.future.cancel()
            self._forget(request)

    def _may_run_now(self, loop: asyncio.AbstractEventLoop, rows: int) -> bool:
        """Whether a request is run at once, in its caller, rather than queued for the worker.

        Only where it would have run alone and whole anyway: an inline batcher (one core) with no
        delay, nothing queued or running, rows that fit one run, and nothing else ready to run on
        the event loop, so no other request could join before the worker's turn. The worker's turn
        costs a loop iteration and a task switch: about 60 us of a lenet5 request served over gRPC
        on one core. asyncio keeps what is ready in its `_ready` queue (not public API); on a loop
        without it, every request is queued.
        """
        options = self.options
        if not options.inline or self._queue or self._running or options.max_queue_delay > 0:
            return False
        if 0 < options.max_batch_size < rows:
            return False
        ready = getattr(loop, "_ready", None)
        return ready is not None and not ready

    def _run_now(
        self,
        feeds: Feeds,
        rows: int,
        deadline: float | None,
        timing: Timing | None,
        loop: asyncio.AbstractEventLoop,
    ) -> list[np.ndarray]:
        """A run of this request alone, reported as a run of a request that waited 0 s in the queue."""
        if deadline is not None and loop.time() >= deadline:
            raise DeadlineExceeded("deadline passed while the request was queued")
        self._on_dequeue(QueueReport(0.0))
        if timing is not None:
            timing.queue = 0.0
        started = time.perf_counter()
        outputs = self._run(feeds)
        seconds = time.perf_counter() - started
        if timing is not None:
            timing.infer += seconds
        self._on_run(RunReport(rows, 1, seconds))
        return list(outputs)

    def _forget(self, request: _Request) -> None:
        """Drop a finished request's rows that never reached a run."""
        if request in self._queue:
            self._queue.remove(request)
            self._pending_rows -= request.rows - request.taken

    async def _work(self) -> None:
        """Take batches from the queue and run them, one at a time per worker.

        A request wakes the worker, which runs one loop iteration later: after the handlers
        already scheduled (requests that arrived together, or while the previous run held the
        loop), which queue first and join the batch. Under load that forms batches without a delay
        timer; a request alone pays one task switch.
        """
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            try:
                if self.options.max_queue_delay > 0:
                    await self._wait_for_fill(loop)
                slices = self._take(loop)
                if slices:
                    await self._execute(loop, slices)
            except Exception:  # a bug here must not stop the model: log it and keep serving
                log.exception("batcher worker failed; continuing")

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
            if slices and request.signature != slices[0].request.signature:
                break  # other shapes or types: the next run takes it
            count = min(room, request.rows - request.taken)
            slices.append(_Slice(request, request.taken, request.taken + count))
            if request.taken == 0:
                waited = now - request.enqueued
                self._on_dequeue(QueueReport(waited))
                if request.timing is not None:
                    request.timing.queue = waited
            request.taken += count
            self._pending_rows -= count
            room -= count
            if request.taken == request.rows:
                self._queue.popleft()
        return slices

    async def _execute(self, loop: asyncio.AbstractEventLoop, slices: list[_Slice]) -> None:
        requests = [piece.request for piece in slices]
        running = self._running
        for request in requests:
            running[request] += 1
        try:
            error = await self._attempt(loop, slices)
            if error is not None:
                await self._isolate(loop, slices, error)
        except Exception as exc:  # a bug here must not leave the run's requests waiting forever
            for piece in slices:
                self._fail(piece, exc)
            raise
        finally:
            for request in requests:
                left = running[request] - 1
                if left > 0:
                    running[request] = left
                else:
                    del running[request]

    async def _attempt(self, loop: asyncio.AbstractEventLoop, slices: list[_Slice]) -> Exception | None:
        """One run of these slices: their requests get their rows' outputs, or the run's error is returned."""
        whole = _is_whole(slices)
        feeds = slices[0].request.feeds if whole else _merge(slices)
        started = time.perf_counter()
        try:
            if self.options.inline:  # one usable core: a thread would only add a hand-off
                outputs = self._run(feeds)
            else:
                outputs = await loop.run_in_executor(self._pool, self._run, feeds)
        except Exception as exc:
            return exc
        seconds = time.perf_counter() - started
        if whole:
            rows = slices[0].stop
        else:
            rows = sum(p.stop - p.start for p in slices)
            shapes = [o.shape for o in outputs if o.ndim == 0 or o.shape[0] != rows]
            if shapes:  # rows cannot be handed back: a run error, so isolation finds who can run
                return RuntimeError(
                    f"the model answered outputs of shapes {shapes} for a batch of {rows} rows"
                )
        self._on_run(RunReport(rows, len(slices), seconds))
        _deliver(slices, outputs, seconds, whole)
        return None

    async def _isolate(self, loop: asyncio.AbstractEventLoop, slices: list[_Slice], error: Exception) -> None:
        """Find the requests of a failed run that cannot run, so that only they fail.

        The run's requests are halved and each half run again (requests already answered,
        cancelled or past their deadline are left out), and a failing half is halved again until
        a run of a single request fails: that request fails with its own error. A model that
        fails whatever its input would cost 2n-1 runs that way, so when both halves of the first
        split that runs both fail, every request left fails with `BatchFailed` (retry; nobody is
        told that their input was at fault, nor sees another request's values): three runs,
        whatever n. What this gives up: two bad requests that land in different halves of that
        split fail their whole run (the neighbours of a single bad request are always answered).
        """
        if len(slices) == 1:  # one request's rows (a request has one slice per run)
            self._fail(slices[0], error)
            return
        retries = alone = with_batch = 0
        first_split = True
        todo = [slices]
        while todo:
            part = todo.pop()
            middle = len(part) // 2
            ran = 0
            failures: list[tuple[list[_Slice], Exception]] = []
            for half in (part[:middle], part[middle:]):
                live = self._still_waiting(loop, half)
                if not live:
                    continue
                ran += 1
                half_error = await self._attempt(loop, live)
                if half_error is not None:
                    failures.append((live, half_error))
            retries += ran
            if first_split and ran == 2:
                first_split = False
                if len(failures) == 2:
                    with_batch = self._give_up([piece for live, _ in failures for piece in live], failures)
                    break
            for live, half_error in failures:
                if len(live) == 1:
                    alone += self._fail(live[0], half_error)
                else:
                    todo.append(live)
        self._on_isolation(IsolationReport(retries, alone, with_batch))

    def _give_up(self, slices: list[_Slice], failures: list[tuple[list[_Slice], Exception]]) -> int:
        """Fail what is left of a run whose two halves both failed; the errors go to the log."""
        log.warning(
            "a batch of %d requests failed in both halves; failing them all: %s",
            len(slices),
            "; ".join(f"{type(error).__name__}: {error}" for _, error in failures),
        )
        failed = BatchFailed(
            "the request failed with its batch: the model failed on both halves of the batch it was in "
            "(a model that fails whatever its input, or more than one request it cannot run); retry"
        )
        return sum(self._fail(piece, failed) for piece in slices)

    def _still_waiting(self, loop: asyncio.AbstractEventLoop, slices: list[_Slice]) -> list[_Slice]:
        """The slices whose request still wants an answer; those past their deadline fail now."""
        now = loop.time()
        live = []
        for piece in slices:
            request = piece.request
            if request.finished():
                continue
            if request.deadline is not None and now >= request.deadline:
                self._fail(piece, DeadlineExceeded("deadline passed before its run could be retried"))
                continue
            live.append(piece)
        return live

    def _fail(self, piece: _Slice, error: Exception) -> int:
        """Fail the slice's request (1) unless it is already finished (0); its queued rows never run."""
        request = piece.request
        self._forget(request)
        if request.finished():
            return 0
        request.future.set_exception(error)
        return 1


def _deliver(slices: list[_Slice], outputs: Sequence[np.ndarray], seconds: float, whole: bool) -> None:
    """Hand each slice its rows of a run's outputs; a request answers once all its rows are back."""
    for piece in slices:
        if piece.request.timing is not None:
            piece.request.timing.infer += seconds
    if whole:
        if not slices[0].request.finished():
            slices[0].request.future.set_result(list(outputs))
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


def _signature(feeds: Feeds) -> object:
    """What must be equal for requests to share a run: each input's name, dtype and row shape."""
    if len(feeds) == 1:  # the common case, without sorting
        ((name, array),) = feeds.items()
        return (name, array.dtype.str, array.shape[1:])
    return tuple((name, a.dtype.str, a.shape[1:]) for name, a in sorted(feeds.items()))


def _rows(feeds: Feeds) -> int:
    if len(feeds) == 1:
        (array,) = feeds.values()
        if array.ndim:
            return int(array.shape[0])
    counts = {array.shape[0] if array.ndim else -1 for array in feeds.values()}
    if len(counts) != 1 or -1 in counts:
        shapes = [a.shape for a in feeds.values()]
        raise ValueError(f"inputs must share a leading batch axis, got shapes {shapes}")
    (rows,) = counts
    return rows


def _is_whole(slices: list[_Slice]) -> bool:
    """One request, all of its rows: its arrays go in and come out as they are."""
    first = slices[0]
    return len(slices) == 1 and first.start == 0 and first.stop == first.request.rows


def _merge(slices: list[_Slice]) -> Feeds:
    """One run's inputs, the slices' rows concatenated."""
    first = slices[0]
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
