"""Per-version statistics: one object records each fact once, into Prometheus and into the
cumulative counters that KServe's ModelStatistics (Triton's extension) reports."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from prometheus_client import Histogram

from service.observability import metrics


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.ns += int(seconds * 1e9)


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
        self.pending = metrics.PENDING.labels(*labels)

    def queued(self, seconds: float) -> None:
        self.queue.add(seconds)
        self._queue.observe(seconds)

    def ran(self, rows: int, seconds: float) -> None:
        """One onnxruntime run of `rows` rows."""
        self.compute_infer.add(seconds)
        self.execution_count += 1
        self.inference_count += rows
        self.last_inference_ms = int(time.time() * 1000)
        self.batches.setdefault(rows, BatchDurations()).compute_infer.add(seconds)
        self._infer.observe(seconds)
        self._batch_size.observe(rows)
        self._inferences.inc(rows)
        self._executions.inc()

    def answered(self, ok: bool, seconds: float) -> None:
        (self.success if ok else self.fail).add(seconds)

    def input_stage(self) -> _Stage:
        """Time turning a request into model inputs."""
        return _Stage(self.compute_input, self._input)

    def output_stage(self) -> _Stage:
        """Time turning model outputs into a response."""
        return _Stage(self.compute_output, self._output)


class _Stage:
    """Times a block that succeeds into a total and a histogram; a failed block is not counted.

    A plain class rather than `@contextmanager`: it runs twice per request, and a generator-based
    context manager costs several times more.
    """

    __slots__ = ("_histogram", "_started", "_total")

    def __init__(self, total: Duration, histogram: Histogram) -> None:
        self._total = total
        self._histogram = histogram
        self._started = 0.0

    def __enter__(self) -> None:
        self._started = time.perf_counter()

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is None:
            seconds = time.perf_counter() - self._started
            self._total.add(seconds)
            self._histogram.observe(seconds)
