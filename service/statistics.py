"""Per-version statistics: one object records each fact once, into Prometheus and into the
cumulative counters that KServe's ModelStatistics (Triton's extension) reports."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from service import metrics


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
    """Everything measured about one model version since it was loaded."""

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
        self._lock = threading.Lock()  # runs report from onnxruntime's threads' callbacks too
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
        with self._lock:
            self.queue.add(seconds)
        self._queue.observe(seconds)

    def ran(self, rows: int, seconds: float) -> None:
        """One onnxruntime run of `rows` rows."""
        with self._lock:
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
        with self._lock:
            (self.success if ok else self.fail).add(seconds)

    @contextmanager
    def input_stage(self) -> Iterator[None]:
        """Time turning a request into model inputs."""
        started = time.perf_counter()
        yield
        seconds = time.perf_counter() - started
        with self._lock:
            self.compute_input.add(seconds)
        self._input.observe(seconds)

    @contextmanager
    def output_stage(self) -> Iterator[None]:
        """Time turning model outputs into a response."""
        started = time.perf_counter()
        yield
        seconds = time.perf_counter() - started
        with self._lock:
            self.compute_output.add(seconds)
        self._output.observe(seconds)
