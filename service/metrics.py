"""Every Prometheus metric of the server, defined once (names `convserve_*`, durations in seconds)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

#: Buckets from 0.5 ms to 10 s: covers a LeNet on a CPU and a captioner's beam search.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

REQUESTS = Counter(
    "convserve_requests",
    "RPCs answered, by model, version, method and gRPC status code.",
    ["model", "version", "method", "code"],
)
REQUEST_DURATION = Histogram(
    "convserve_request_duration_seconds",
    "Time from receiving an RPC to sending its answer.",
    ["model", "version", "method"],
    buckets=LATENCY_BUCKETS,
)
INFERENCE_DURATION = Histogram(
    "convserve_inference_duration_seconds",
    "Time onnxruntime spent on one run (one batch).",
    ["model", "version"],
    buckets=LATENCY_BUCKETS,
)
IMAGES = Counter(
    "convserve_images",
    "Images processed, by model and version.",
    ["model", "version"],
)
MODEL_READY = Gauge(
    "convserve_model_ready",
    "1 when the model version is loaded and serving, else 0; `provider` is the execution provider it got.",
    ["model", "version", "provider"],
)
