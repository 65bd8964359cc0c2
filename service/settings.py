"""Server settings: one class, read from CONVSERVE_* environment variables, overridden by CLI flags.

Nothing here runs at import time; `Settings()` reads the environment when it is called.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every knob of the server, with its default. Env: CONVSERVE_<FIELD>, e.g. CONVSERVE_GRPC_PORT."""

    model_config = SettingsConfigDict(env_prefix="CONVSERVE_", extra="forbid")

    model_repository: Path = Field(
        default=Path("models"), description="Folder with one sub-folder per model (config.yaml + versions)."
    )
    host: str = Field(
        default="0.0.0.0",
        description="Address the gRPC, HTTP and (unless metrics_host) metrics ports bind to.",
    )
    grpc_port: int = Field(
        default=8001, ge=0, le=65535, description="gRPC port (KServe convention: 8001); 0 picks a free one."
    )
    http_port: int = Field(
        default=8000, ge=-1, le=65535, description="KServe v2 HTTP/REST port (8000); -1 turns it off."
    )
    metrics_port: int = Field(
        default=8002, ge=-1, le=65535, description="Prometheus /metrics port (8002); -1 turns it off."
    )
    providers: list[str] = Field(
        default=["CUDAExecutionProvider", "CPUExecutionProvider"],
        description="onnxruntime execution providers, in order of preference.",
    )
    require_gpu: bool = Field(
        default=False,
        description="Fail a model's readiness instead of running it on the CPU when CUDA is not active.",
    )
    intra_op_threads: int = Field(
        default=0,
        ge=0,
        description="onnxruntime intra-op threads per session; 0: the CPUs the process may use (its affinity "
        "mask and its cgroup CPU quota, whichever is smaller).",
    )
    ort_spinning: bool = Field(
        default=False,
        description="Let onnxruntime's idle pool threads busy-wait (faster hand-off, but they take CPU).",
    )
    execution: Literal["auto", "thread", "inline"] = Field(
        default="auto",
        description="Where onnxruntime runs: a thread per model, or inline on the event loop (no hand-off; "
        "for a process on one core); auto: inline when the process may use only one CPU.",
    )
    grpc_threads_priority: Literal["auto", "low", "normal"] = Field(
        default="auto",
        description="low: gRPC's own threads (poller, network) run at nice 19, below the event loop, so "
        "on one core they do not preempt it at every event; auto: low when the process may use only one CPU.",
    )
    warmup: bool = Field(default=True, description="Run one batch through each model before it is ready.")
    min_models: int = Field(
        default=0,
        ge=0,
        description="Readiness (the overall health entry, KServe ServerReady) only while at least this many "
        "models have a ready version: a server that found fewer (an image or volume without its models, a "
        "failed load, an unload) is not ready until enough are. 0: no minimum.",
    )
    repository_poll_seconds: float = Field(
        default=5.0,
        ge=0,
        description="How often to look for models and versions that arrive later; 0 turns polling off.",
    )
    max_batch_size: int = Field(
        default=64,
        ge=0,
        description="Default rows per onnxruntime run (1: batching off); config.yaml may override.",
    )
    max_queue_delay: float = Field(
        default=0.0,
        ge=0,
        description="Default seconds a run waits for a fuller batch; config.yaml may override.",
    )
    max_queue_size: int = Field(
        default=1024, gt=0, description="Default rows queued per model before RESOURCE_EXHAUSTED."
    )
    instances: int = Field(default=1, gt=0, description="Default concurrent onnxruntime runs per model.")
    max_images_per_request: int = Field(
        default=1024, gt=0, description="Most images one Classify or Caption call may carry."
    )
    max_concurrent_streams: int = Field(
        default=1024,
        gt=0,
        description="Most RPCs in flight on one gRPC connection (HTTP/2 streams); more get UNAVAILABLE.",
    )
    max_decode_queue: int = Field(
        default=1024, gt=0, description="Caption: most images waiting for or in the decode loop, per model."
    )
    max_generate_count: int = Field(
        default=256, gt=0, description="Most images one Generate call may ask for."
    )
    max_beam_size: int = Field(
        default=10, gt=0, description="Caption: the largest beam_size a request may ask for."
    )
    max_caption_length: int = Field(
        default=50,
        gt=0,
        description="Caption: the most words a request may ask for (the model's own max_length caps it too).",
    )
    max_decode_batch: int = Field(
        default=256,
        gt=0,
        description="Caption: most hypotheses (rows) per decoder step; requests beyond it join a later step.",
    )
    caption_batching: bool = Field(
        default=True,
        description="Caption: advance every active request's hypotheses in one decoder call per step "
        "(iteration-level batching); off, each request is decoded alone, one after another.",
    )
    default_top_k: int = Field(default=3, gt=0, description="Classify's top_k when a request sets none.")
    max_image_pixels: int = Field(
        default=16_000_000,
        gt=0,
        description="Largest image (width x height) accepted, checked before decoding.",
    )
    max_request_pixels: int = Field(
        default=64_000_000,
        gt=0,
        description="Most decoded pixels (width x height, summed over its images) one request may cost, "
        "checked from the images' headers before any is decoded.",
    )
    max_message_bytes: int = Field(
        default=64 * 1024 * 1024,
        gt=0,
        description="Largest gRPC message accepted or sent, and largest HTTP body (binary tensor data).",
    )
    max_json_bytes: int = Field(
        default=8 * 1024 * 1024,
        gt=0,
        description="Largest JSON part of an HTTP request (a KServe JSON body, or the JSON header before "
        "binary tensor data); parsing JSON costs far more memory and time per byte than binary data, so "
        "larger tensors go as binary data.",
    )
    decode_threads: int = Field(
        default=0,
        ge=0,
        description="Threads of the decode pool (image decoding and pre-processing, PNG encoding); "
        "0: one per usable CPU, at most 8.",
    )
    decode_processes: int = Field(
        default=1,
        ge=0,
        description="Processes of the decode pool for work that holds the GIL (parsing JSON bodies larger "
        "than a few KiB); 0: such work runs in the decode threads, where it can stall the event loop.",
    )
    decode_queue: int = Field(
        default=64,
        gt=0,
        description="Requests that may wait for a decode thread; beyond them RESOURCE_EXHAUSTED (HTTP 503).",
    )
    default_timeout_seconds: float = Field(
        default=30.0,
        ge=0,
        description="Deadline of a request whose client set none (gRPC: no deadline; HTTP: no `timeout` "
        "parameter), so queued work never waits forever; 0: no default deadline.",
    )
    console: bool = Field(
        default=True,
        description="Serve the web console at / on the HTTP port (static files: it calls the public "
        "HTTP API with the visitor's token); false: / and /console/ answer 404.",
    )
    http_idle_timeout_seconds: float = Field(
        default=15.0,
        gt=0,
        description="HTTP: close a connection that sends no complete request header within this time, "
        "after it opens or after its last answer (slow or idle clients hold no socket for long).",
    )
    http_body_timeout_seconds: float = Field(
        default=30.0,
        gt=0,
        description="HTTP: the most seconds a request's body may take to arrive once its header has; "
        "slower is answered 408 (a client trickling bytes holds no connection for long).",
    )
    http_max_connections: int = Field(
        default=1000,
        gt=0,
        description="HTTP: most open connections; a connection beyond them is answered 503 and closed.",
    )
    metrics_host: str = Field(
        default="",
        description="Address the metrics port binds to; empty: the same as host. 127.0.0.1 keeps it "
        "to the machine (e.g. a sidecar or node agent scrapes it).",
    )
    metrics_auth: bool = Field(
        default=False,
        description="Require a bearer token (auth_tokens or admin_tokens) on the metrics port too.",
    )
    shutdown_grace_seconds: float = Field(
        default=10.0, ge=0, description="On SIGTERM, how long in-flight requests may take to finish."
    )
    keepalive_time_seconds: float = Field(
        default=60.0,
        gt=0,
        description="gRPC: ping a client after this long without activity on its connection, so that "
        "connections to clients that vanished (a node gone, a NAT that forgot) are noticed and closed.",
    )
    keepalive_timeout_seconds: float = Field(
        default=20.0,
        gt=0,
        description="gRPC: close the connection when a keepalive ping gets no answer within this time.",
    )
    keepalive_min_ping_interval_seconds: float = Field(
        default=10.0,
        gt=0,
        description="gRPC: the shortest interval at which clients may send keepalive pings, also on idle "
        "connections; a client pinging more often is told GOAWAY (too_many_pings).",
    )
    max_connection_age_seconds: float = Field(
        default=300.0,
        ge=0,
        description="gRPC: after about this long (+/-10 % jitter) a connection is sent GOAWAY, so clients "
        "reconnect, re-resolve DNS and spread over new replicas (e.g. pods an autoscaler added); "
        "0 keeps connections forever.",
    )
    max_connection_age_grace_seconds: float = Field(
        default=60.0,
        ge=0,
        description="gRPC: how long RPCs (streams included) still running on a connection sent GOAWAY "
        "for its age may take to finish before the connection is closed.",
    )
    tls_cert_file: Path | None = Field(
        default=None,
        description="PEM server certificate (chain); with tls_key_file, the gRPC and HTTP ports speak TLS.",
    )
    tls_key_file: Path | None = Field(default=None, description="PEM private key of tls_cert_file.")
    tls_client_ca_file: Path | None = Field(
        default=None,
        description="PEM CA bundle: clients must present a certificate it signed (mutual TLS).",
    )
    health_port: int | None = Field(
        default=None,
        ge=-1,
        le=65535,
        description="Plaintext port serving grpc.health.v1 only (for kubelet probes); unset: 8003 when TLS "
        "is on, off otherwise; -1 turns it off; 0 picks a free one.",
    )
    auth_tokens: SecretStr = Field(
        default=SecretStr(""),
        description="Comma-separated bearer tokens; with any (here or in the file), tokens are required.",
    )
    auth_tokens_file: Path | None = Field(default=None, description="File with bearer tokens, one per line.")
    admin_tokens: SecretStr = Field(
        default=SecretStr(""),
        description="Comma-separated admin bearer tokens: accepted everywhere, and the only ones that may "
        "load/unload models when repository_control is admin.",
    )
    admin_tokens_file: Path | None = Field(default=None, description="File with admin tokens, one per line.")
    auth_health: bool = Field(
        default=False, description="Require tokens for health checks and reflection too (not on health_port)."
    )
    repository_control: Literal["enabled", "disabled", "admin"] = Field(
        default="disabled",
        description="Model load/unload over the network: disabled (the default: PERMISSION_DENIED), enabled, "
        "or admin (admin tokens only). Polling still loads what arrives on disk.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(default="INFO", description="Log level.")
    log_format: Literal["json", "text"] = Field(
        default="json", description="json: one object per line (for log pipelines); text: for people."
    )


def one_usable_cpu() -> bool:
    """The process may use one CPU only (pinned with taskset, a cpuset of one, a CPU limit of <= 1)."""
    return usable_cpus() == 1


def usable_cpus() -> int:
    """The CPUs this process may really use: its affinity mask, capped by its cgroup CPU quota (what a
    container's or a pod's CPU limit sets), rounded up. onnxruntime's own default counts the host's
    cores, which escapes both: on a large node with a small limit its threads are throttled."""
    cpus = len(os.sched_getaffinity(0))
    quota = cgroup_cpu_quota()
    return cpus if quota is None else max(1, min(cpus, math.ceil(quota)))


def cgroup_cpu_quota(
    proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")
) -> float | None:
    """CPUs' worth of the smallest CPU quota on this process's cgroup and its ancestors (cgroup v2
    `cpu.max`, or v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`); None when unlimited or unreadable."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    quotas = []
    for line in lines:
        hierarchy, controllers, path = line.split(":", 2)
        if hierarchy == "0" and not controllers:  # v2: the unified hierarchy
            bases = [root, root / "unified"]
            read = _cpu_max
        elif "cpu" in controllers.split(","):
            bases = [root / controllers, root / "cpu", root / "cpu,cpuacct"]
            read = _cfs_quota
        else:
            continue
        for base in bases:
            if base.is_dir():
                quotas += _along_the_path(base, path, read)
                break
    return min(quotas, default=None)


def _along_the_path(base: Path, path: str, read: Callable[[Path], float | None]) -> list[float]:
    """The quotas set on the cgroup directory of `path` under `base` and on each of its parents
    (inside a container's cgroup namespace the path is "/" and `base` is the container's own)."""
    directory = base / path.lstrip("/")
    found = []
    while True:
        quota = read(directory)
        if quota is not None:
            found.append(quota)
        if directory == base or base not in directory.parents:
            return found
        directory = directory.parent


def _cpu_max(directory: Path) -> float | None:
    try:
        quota, period = (directory / "cpu.max").read_text().split()
    except (OSError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


def _cfs_quota(directory: Path) -> float | None:
    try:
        quota = int((directory / "cpu.cfs_quota_us").read_text())
        period = int((directory / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota <= 0 or period <= 0 else quota / period


def grpc_threads_low(priority: str) -> bool:
    """Whether gRPC's threads go below the event loop: asked for, or auto with a single usable CPU.

    With more CPUs they run beside the loop, and a low priority would only let other processes
    delay the network work.
    """
    return _auto_on_one_cpu(priority, "low")


def runs_inline(execution: str) -> bool:
    """Whether onnxruntime runs on the event loop: asked for, or auto with a single usable CPU.

    With one core a worker thread adds only a hand-off per run (measured: about 10% of lenet5's
    throughput at concurrency 64 on a pinned core).
    """
    return _auto_on_one_cpu(execution, "inline")


def _auto_on_one_cpu(choice: str, wanted: str) -> bool:
    """`choice` is `wanted`, or `auto` in a process that may use only one CPU."""
    return one_usable_cpu() if choice == "auto" else choice == wanted
