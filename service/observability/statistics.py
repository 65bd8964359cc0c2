"""Per-version statistics: one object records each fact once, into Prometheus and into the
cumulative counters that KServe's ModelStatistics (Triton's extension) reports.

As in Triton, the request statistics (success, queue, compute input / infer / output) count
requests: each request's durations are kept in its own `RequestTimes` while it runs and are
committed together when it succeeds, so any read sees equal compute counts (perf_analyzer checks
that). A run's time counts in full for every request that had rows in it. Runs are counted apart:
`execution_count`, `inference_count` (rows) and the per-batch-size statistics.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from service.observability import metrics
from service.observability.loop_metrics import HistogramChild
from service.observability.recent import RecentWindow


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.ns += int(seconds * 1e9)


@dataclass(slots=True)
class RequestTimes:
    """One request's seconds in each stage, until it answers; the batcher adds queue and infer."""

    input: float = 0.0
    queue: float = 0.0
    infer: float = 0.0
    output: float = 0.0


@dataclass
class BatchDurations:
    compute_infer: Duration = field(default_factory=Duration)


class VersionStatistics:
    """Everything measured about one model version since it was loaded.

    Every caller runs on the event loop (the batcher reports runs after awaiting them), so no lock.
    """

    def __init__(self, model: str, version: str) -> None:
        self.success = Duration()
        self.fail = Duration()
        self.queue = Duration()
        self.compute_input = Duration()
        self.compute_infer = Duration()
        self.compute_output = Duration()
        self.inference_count = 0
        self.execution_count = 0
        self.last_inference_ms = 0
        self.batches: dict[int, BatchDurations] = {}
        labels = (model, version)
        self._queue = metrics.QUEUE_DURATION.labels(*labels)
        self._input = metrics.COMPUTE_INPUT_DURATION.labels(*labels)
        self._infer = metrics.COMPUTE_INFER_DURATION.labels(*labels)
        self._output = metrics.COMPUTE_OUTPUT_DURATION.labels(*labels)
        self._batch_size = metrics.BATCH_SIZE.labels(*labels)
        self._inferences = metrics.INFERENCES.labels(*labels)
        self._executions = metrics.EXECUTIONS.labels(*labels)
        self._retries = metrics.BATCH_RETRIES.labels(*labels)
        self._failed_alone = metrics.ISOLATED_FAILURES.labels(*labels, "input")
        self._failed_with_batch = metrics.ISOLATED_FAILURES.labels(*labels, "batch")
        self.pending = metrics.PENDING.labels(*labels)
        self.recent = RecentWindow()  # the last minute, for the console's live figures

    def queued(self, seconds: float) -> None:
        """A request's first rows left the queue after `seconds` (the histogram; the KServe
        statistics take the request's queue time when it answers)."""
        self._queue.observe(seconds)

    def ran(self, rows: int, seconds: float) -> None:
        """One onnxruntime run of `rows` rows (its time reaches each request's compute_infer)."""
        self.execution_count += 1
        self.inference_count += rows
        self.last_inference_ms = int(time.time() * 1000)
        batch = self.batches.get(rows)
        if batch is None:
            batch = self.batches[rows] = BatchDurations()
        batch.compute_infer.add(seconds)
        self._infer.observe(seconds)
        self._batch_size.observe(rows)
        self._inferences.inc(rows)
        self._executions.inc()

    def isolated(self, retries: int, alone: int, with_batch: int) -> None:
        """A failed batch was split: `retries` runs more; requests that failed alone (they cannot
        run) and with their batch (both halves failed)."""
        self._retries.inc(retries)
        self._failed_alone.inc(alone)
        self._failed_with_batch.inc(with_batch)

    def answered(self, ok: bool, seconds: float, times: RequestTimes | None = None) -> None:
        """A request answered: a success commits all of its stage times at once, a failure only
        counts as one."""
        self.recent.record(seconds, ok)
        if not ok:
            self.fail.add(seconds)
            return
        self.success.add(seconds)
        if times is None:
            times = RequestTimes()
        self.queue.add(times.queue)
        self.compute_input.add(times.input)
        self.compute_infer.add(times.infer)
        self.compute_output.add(times.output)

    def input_stage(self, times: RequestTimes) -> _Stage:
        """Time turning a request into model inputs."""
        return _Stage(times, False, self._input)

    def output_stage(self, times: RequestTimes) -> _Stage:
        """Time turning model outputs into a response."""
        return _Stage(times, True, self._output)


class _Stage:
    """Adds a block's seconds to a request's input or output time and to a histogram; a failed
    block is not counted.

    A plain class rather than `@contextmanager`: it runs twice per request, and a generator-based
    context manager costs several times more.
    """

    __slots__ = ("_histogram", "_output", "_started", "_times")

    def __init__(self, times: RequestTimes, output: bool, histogram: HistogramChild) -> None:
        self._times = times
        self._output = output
        self._histogram = histogram
        self._started = 0.0

    def __enter__(self) -> None:
        self._started = time.perf_counter()

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is None:
            seconds = time.perf_counter() - self._started
            if self._output:
                self._times.output += seconds
            else:
                self._times.input += seconds
            self._histogram.observe(seconds)
