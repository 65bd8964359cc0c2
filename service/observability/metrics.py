"""Every Prometheus metric of the server, defined once (names `convserve_*`, durations in seconds).

Label values stay bounded: `model` and `version` are names of models the server has (or
"unknown" for requests naming none it has), never a string a client made up.

The request path's metrics are written on the event loop only and are `Loop*` metrics (no lock
per update, see loop_metrics.py); those written from other threads are prometheus_client's.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from service.observability.loop_metrics import LoopCounter, LoopGauge, LoopHistogram

#: Buckets from 0.1 ms to 10 s: covers a LeNet on a CPU and a captioner's beam search.
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
LOAD_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

UNKNOWN_MODEL = "unknown"

REQUESTS = LoopCounter(
    "convserve_requests",
    "Requests answered, by model, version, method, status (gRPC code names, HTTP too) and transport.",
    ["model", "version", "method", "code", "transport"],
)
FAILURES = LoopCounter(
    "convserve_request_failures",
    "RPCs that failed, by reason (the lower-case gRPC status: queue full is resource_exhausted).",
    ["model", "version", "reason"],
)
REQUEST_DURATION = LoopHistogram(
    "convserve_request_duration_seconds",
    "Time from receiving a request to sending its answer, by transport (grpc, http).",
    ["model", "version", "method", "transport"],
    buckets=LATENCY_BUCKETS,
)
QUEUE_DURATION = LoopHistogram(
    "convserve_queue_duration_seconds",
    "Time a request waited in the batcher's queue before its first rows ran.",
    ["model", "version"],
    buckets=LATENCY_BUCKETS,
)
COMPUTE_INPUT_DURATION = LoopHistogram(
    "convserve_compute_input_duration_seconds",
    "Time to turn a request into input arrays (decode, pre-process, tensor checks).",
    ["model", "version"],
    buckets=LATENCY_BUCKETS,
)
COMPUTE_INFER_DURATION = LoopHistogram(
    "convserve_compute_infer_duration_seconds",
    "Time onnxruntime spent on one run (one batch).",
    ["model", "version"],
    buckets=LATENCY_BUCKETS,
)
COMPUTE_OUTPUT_DURATION = LoopHistogram(
    "convserve_compute_output_duration_seconds",
    "Time to turn output arrays into a response (softmax, top-k, encoding).",
    ["model", "version"],
    buckets=LATENCY_BUCKETS,
)
BATCH_SIZE = LoopHistogram(
    "convserve_batch_size",
    "Rows (images) per onnxruntime run.",
    ["model", "version"],
    buckets=BATCH_BUCKETS,
)
INFERENCES = LoopCounter(
    "convserve_inferences",
    "Rows (images) inferred; divided by executions it gives the mean batch size.",
    ["model", "version"],
)
EXECUTIONS = LoopCounter(
    "convserve_executions",
    "onnxruntime runs.",
    ["model", "version"],
)
BATCH_RETRIES = LoopCounter(
    "convserve_batch_retries",
    "onnxruntime runs made again after a run of several requests failed, to find the requests that "
    "cannot run (the others still get their answers).",
    ["model", "version"],
)
ISOLATED_FAILURES = LoopCounter(
    "convserve_isolated_failures",
    "Requests that failed in runs retried after their batch failed, by cause: `input` (the request "
    "failed alone: it cannot run), `batch` (both halves of its batch failed: it failed with them).",
    ["model", "version", "cause"],
)
PENDING = LoopGauge(
    "convserve_pending_requests",
    "Requests waiting in the queue or running.",
    ["model", "version"],
)
MODEL_READY = Gauge(
    "convserve_model_ready",
    "1 when the model version is loaded and serving, else 0; `provider` is the execution provider it got.",
    ["model", "version", "provider"],
)
MODEL_LOAD_DURATION = Histogram(
    "convserve_model_load_duration_seconds",
    "Time to load and warm up a model version.",
    ["model"],
    buckets=LOAD_BUCKETS,
)
MODEL_LOAD_FAILURES = Counter(
    "convserve_model_load_failures",
    "Model versions that failed to load.",
    ["model"],
)
DECODE_ACTIVE_HYPOTHESES = Histogram(
    "convserve_decode_active_hypotheses",
    "Caption decode loop: hypotheses (rows) advanced by one decoder step, over every request in it.",
    ["model", "version"],
    buckets=BATCH_BUCKETS,
)
DECODE_ACTIVE_REQUESTS = Histogram(
    "convserve_decode_active_requests",
    "Caption decode loop: images (one beam each) advanced by one decoder step.",
    ["model", "version"],
    buckets=BATCH_BUCKETS,
)
DECODE_STEPS = Histogram(
    "convserve_decode_steps",
    "Caption decode loop: decoder steps one image's beam search took (finished, expired or cancelled).",
    ["model", "version"],
    buckets=(1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128),
)
DECODE_STEP_DURATION = Histogram(
    "convserve_decode_step_duration_seconds",
    "Caption decode loop: one step, from gathering the hypotheses to the beam bookkeeping after the run.",
    ["model", "version"],
    buckets=LATENCY_BUCKETS,
)
DECODE_DROPPED = Counter(
    "convserve_decode_dropped",
    "Caption decode loop: images that left the loop unfinished, by reason (cancelled, deadline_exceeded).",
    ["model", "version", "reason"],
)
DECODE_POOL_REFUSED = Counter(
    "convserve_decode_pool_refused",
    "Requests refused (RESOURCE_EXHAUSTED, HTTP 503) because every decode thread was busy and the "
    "decode queue (decode_queue) was full.",
)
DECODE_POOL_PENDING = Gauge(
    "convserve_decode_pool_pending",
    "Work in the decode pool: running on its threads or waiting for one.",
)
