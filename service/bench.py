"""`convserve bench`: a closed-loop load generator, and a batching off / on / in-process comparison.

Closed loop: each of `concurrency` workers sends its next request when the previous one answers,
so the offered load follows the server's speed and latency is not inflated by a client backlog.
A warm-up period runs first and is not counted. The generator reports its own CPU use (process
CPU seconds over wall seconds) because a saturated client caps throughput as surely as a server.

`--compare` starts two servers on the same repository, one with batching off (max_batch_size 1)
and one with the defaults, and measures them beside an onnxruntime session in this process, in
interleaved order (per repeat, per concurrency: off, on, in-process), so that drift on a noisy
machine hits every mode alike.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from service._proto.convserve.v1 import vision_pb2, vision_pb2_grpc
from service._proto.inference import grpc_predict_v2_pb2 as kserve_pb2
from service._proto.inference import grpc_predict_v2_pb2_grpc as kserve_grpc
from service.client import DEFAULT_TIMEOUT_SECONDS, VisionClient, to_image
from service.runtime import CPU, ModelSession, SessionOptions
from service.tensors import DATATYPES

APIS = ("task", "kserve")
DEFAULT_CONCURRENCY = 16
DEFAULT_DURATION_SECONDS = 10.0
DEFAULT_WARMUP_SECONDS = 1.0
DEFAULT_CHANNELS = 4
COMPARE_CONCURRENCY = (1, 16, 64)
COMPARE_DURATION_SECONDS = 3.0
COMPARE_REPEATS = 3
#: Rows per onnxruntime run tried in-process to find the compute limit.
BATCH_SIZES = (1, 8, 32, 64, 128)
#: Modes of a comparison, in the order each repeat runs them.
MODES = ("off", "on", "inprocess")
MODE_NAMES = {
    "off": "batching off (max_batch_size 1)",
    "on": "batching on (server defaults)",
    "inprocess": "in-process onnxruntime",
}
#: Most distinct pre-built requests; they are reused round-robin, so building them costs nothing later.
MAX_DISTINCT_REQUESTS = 512
#: How many random inputs stand in for real images when the model's data is not available.
RANDOM_INPUTS = 256
SERVER_START_SECONDS = 120.0
SERVER_STOP_SECONDS = 30.0


class BenchError(Exception):
    """A benchmark cannot run as asked; the message says why."""


# --- results -------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), interpolating between the closest ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass(frozen=True)
class LoadResult:
    """One measured run: successful requests and their latency, errors by code, the client's CPU."""

    concurrency: int
    requests: int  # answered OK inside the measurement window
    images: int
    seconds: float  # length of the measurement window
    cpu_percent: float  # this process's CPU time over the window, in % of one core
    p50_ms: float  # nan when no request succeeded
    p90_ms: float
    p99_ms: float
    errors: dict[str, int] = field(default_factory=dict)  # status code (or exception type) -> count

    @property
    def requests_per_second(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        record = {k: _finite_or_none(v) for k, v in asdict(self).items()}
        record["requests_per_second"] = self.requests_per_second
        record["images_per_second"] = self.images_per_second
        return record


def _finite_or_none(value: Any) -> Any:
    """JSON has no NaN: a missing figure is null."""
    return None if isinstance(value, float) and math.isnan(value) else value


# --- the closed loop -----------------------------------------------------------------------------

#: Sends request number `sequence` and returns when it is answered; raises on failure.
Call = Callable[[int], Awaitable[object]]


@dataclass
class _Window:
    """The measurement window, shared by the workers of one run."""

    measuring: bool = False
    stopping: bool = False
    end: float = math.inf
    issued: int = 0  # requests mode: requests sent since the window opened
    latencies: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)

    def counted(self) -> int:
        return len(self.latencies) + sum(self.errors.values())


async def _attempt(call: Call, sequence: int) -> str:
    """The status of one call: "OK", a gRPC status code name, or an exception's type name."""
    try:
        await call(sequence)
    except grpc.aio.AioRpcError as exc:
        return exc.code().name
    except Exception as exc:  # in-process runs raise onnxruntime's own exception types
        return type(exc).__name__
    return "OK"


async def run_load(
    call: Call,
    concurrency: int,
    *,
    duration: float | None = None,
    requests: int | None = None,
    warmup: float = DEFAULT_WARMUP_SECONDS,
    images_per_request: int = 1,
) -> LoadResult:
    """Drive `call` from `concurrency` workers for `duration` seconds or `requests` requests.

    Duration mode counts the requests answered inside the window (a closed loop's throughput);
    requests mode counts exactly the first `requests` requests sent after the warm-up.
    """
    if (duration is None) == (requests is None):
        raise ValueError("give exactly one of duration and requests")
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    if (duration is not None and duration <= 0) or (requests is not None and requests < 1) or warmup < 0:
        raise ValueError(
            f"need duration > 0 or requests >= 1 and warmup >= 0, got {duration} {requests} {warmup}"
        )
    window = _Window()
    finished = asyncio.Event()

    async def worker(first: int) -> None:
        sequence = first
        while not window.stopping:
            counts = window.measuring
            if counts and requests is not None:
                if window.issued >= requests:
                    return
                window.issued += 1
            sent = time.perf_counter()
            code = await _attempt(call, sequence)
            answered = time.perf_counter()
            sequence += concurrency
            if requests is None:
                counts = window.measuring and answered <= window.end
            if not counts:
                continue
            if code == "OK":
                window.latencies.append(answered - sent)
            else:
                window.errors[code] += 1
            if requests is not None and window.counted() == requests:
                window.end = answered
                finished.set()

    workers = [asyncio.create_task(worker(i)) for i in range(concurrency)]
    try:
        if warmup > 0:
            await asyncio.sleep(warmup)
        start, cpu_start = time.perf_counter(), time.process_time()
        window.measuring = True
        if duration is not None:
            await asyncio.sleep(duration)
            window.end = time.perf_counter()
        else:
            await finished.wait()
        cpu_end = time.process_time()
    except BaseException:  # cancelled or interrupted: abandon the requests in flight
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        raise
    window.stopping = True  # the requests in flight finish, uncounted
    await asyncio.gather(*workers)
    seconds = window.end - start
    latencies_ms = [s * 1000 for s in window.latencies]

    def pct(q: float) -> float:
        return percentile(latencies_ms, q) if latencies_ms else math.nan

    return LoadResult(
        concurrency=concurrency,
        requests=len(latencies_ms),
        images=len(latencies_ms) * images_per_request,
        seconds=seconds,
        cpu_percent=100 * (cpu_end - cpu_start) / seconds if seconds > 0 else 0.0,
        p50_ms=pct(50),
        p90_ms=pct(90),
        p99_ms=pct(99),
        errors=dict(sorted(window.errors.items())),
    )


# --- what is sent --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """The model's input tensor as the server describes it, and the images to send."""

    model: str
    version: str  # the newest ready version the server reported
    input_name: str
    datatype: str  # KServe datatype, e.g. "UINT8"
    images: np.ndarray  # (N, *item shape)
    source: str  # where the images came from, for the report


def workload_images(
    model: str, item_shape: Sequence[int], datatype: str, seed: int = 0
) -> tuple[np.ndarray, str]:
    """Held-out digits for lenet5 when the trainer's data is importable, else random values.

    The server image has neither scikit-learn nor torch, so the random fallback must exist.
    """
    shape = tuple(item_shape)
    if any(d < 0 for d in shape):
        raise BenchError(f"the model's input has free dimensions {list(shape)}; cannot make inputs for it")
    if model == "lenet5" and datatype == "UINT8":
        try:
            from training.data.digits import load_digit_splits
        except ImportError:
            pass
        else:
            images = load_digit_splits().test.images
            if images.shape[1:] == shape:
                return images, f"{len(images)} held-out digits"
    if datatype not in DATATYPES or datatype == "BYTES":
        raise BenchError(f"the model's input is {datatype}; only numeric inputs can be generated")
    dtype = DATATYPES[datatype].dtype
    images = np.random.default_rng(seed).integers(0, 256, size=(RANDOM_INPUTS, *shape)).astype(dtype)
    return images, f"{len(images)} random {datatype} inputs"


async def fetch_workload(channel: grpc.aio.Channel, model: str, timeout: float) -> Workload:
    """Ask the server (KServe ModelMetadata) for the model's input tensor, then pick the images."""
    stub = kserve_grpc.GRPCInferenceServiceStub(channel)
    metadata = await stub.ModelMetadata(kserve_pb2.ModelMetadataRequest(name=model), timeout=timeout)
    if len(metadata.inputs) != 1:
        names = [t.name for t in metadata.inputs]
        raise BenchError(f"model {model!r} takes {len(names)} inputs {names}; bench sends one image tensor")
    (tensor,) = metadata.inputs
    if not tensor.shape or tensor.shape[0] != -1:
        raise BenchError(f"model {model!r} has no free batch axis (input shape {list(tensor.shape)})")
    images, source = workload_images(model, tensor.shape[1:], tensor.datatype)
    version = metadata.versions[0] if metadata.versions else ""
    return Workload(model, version, tensor.name, tensor.datatype, images, source)


def _groups(images: np.ndarray, per_request: int) -> list[np.ndarray]:
    """Consecutive groups of `per_request` images (wrapping around), at most MAX_DISTINCT_REQUESTS."""
    count = min(max(1, len(images) // per_request), MAX_DISTINCT_REQUESTS)
    return [
        np.ascontiguousarray(images[np.arange(i * per_request, (i + 1) * per_request) % len(images)])
        for i in range(count)
    ]


def _as_picture(item: np.ndarray) -> np.ndarray:
    """(C, H, W) -> (H, W) or (H, W, C): the layout of a raw image in the task API."""
    if item.ndim != 3 or item.shape[0] not in (1, 3, 4) or item.dtype != np.uint8:
        raise BenchError(f"the task API sends uint8 (C, H, W) images with C in 1, 3, 4; got {item.shape}")
    return item[0] if item.shape[0] == 1 else item.transpose(1, 2, 0)


def task_requests(workload: Workload, per_request: int) -> list[vision_pb2.ClassifyRequest]:
    return [
        vision_pb2.ClassifyRequest(model=workload.model, images=[to_image(_as_picture(i)) for i in group])
        for group in _groups(workload.images, per_request)
    ]


def kserve_requests(workload: Workload, per_request: int) -> list[kserve_pb2.ModelInferRequest]:
    requests = []
    for group in _groups(workload.images, per_request):
        request = kserve_pb2.ModelInferRequest(model_name=workload.model)
        request.inputs.add(name=workload.input_name, datatype=workload.datatype, shape=group.shape)
        request.raw_input_contents.append(group.tobytes())
        requests.append(request)
    return requests


# --- against a server ----------------------------------------------------------------------------


def open_channels(target: str, count: int) -> list[grpc.aio.Channel]:
    """`count` channels, each with its own connection.

    One channel is one HTTP/2 connection: every stream shares its socket, its flow-control window
    and the single I/O path that serves it, which can cap throughput at high concurrency. Workers
    share a few channels round-robin instead. gRPC folds channels with equal arguments back onto one
    connection unless each keeps a local subchannel pool.
    """
    options = [
        ("grpc.use_local_subchannel_pool", 1),
        ("grpc.max_receive_message_length", 64 * 1024 * 1024),
        ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ]
    return [grpc.aio.insecure_channel(target, options=options) for _ in range(count)]


async def bench_server(
    target: str,
    workload: Workload,
    api: str = "task",
    concurrency: int = DEFAULT_CONCURRENCY,
    *,
    duration: float | None = None,
    requests: int | None = None,
    images_per_request: int = 1,
    warmup: float = DEFAULT_WARMUP_SECONDS,
    channels: int = DEFAULT_CHANNELS,
    timeout: float = DEFAULT_TIMEOUT_SECONDS,
) -> LoadResult:
    """Closed-loop load on a running server through the task API (Classify) or KServe (ModelInfer)."""
    if api not in APIS:
        raise ValueError(f"api must be one of {APIS}, got {api!r}")
    opened = open_channels(target, max(1, min(channels, concurrency)))
    try:
        if api == "task":
            stubs: list[Any] = [vision_pb2_grpc.VisionStub(c) for c in opened]
            messages: list[Any] = task_requests(workload, images_per_request)
            method = "Classify"
        else:
            stubs = [kserve_grpc.GRPCInferenceServiceStub(c) for c in opened]
            messages = kserve_requests(workload, images_per_request)
            method = "ModelInfer"
        calls = [getattr(stub, method) for stub in stubs]

        def call(sequence: int) -> Awaitable[object]:
            # sequence % concurrency is the worker: each worker stays on one channel.
            rpc = calls[(sequence % concurrency) % len(calls)]
            return rpc(messages[sequence % len(messages)], timeout=timeout)

        return await run_load(
            call,
            concurrency,
            duration=duration,
            requests=requests,
            warmup=warmup,
            images_per_request=images_per_request,
        )
    finally:
        await asyncio.gather(*(c.close() for c in opened))


# --- in this process -----------------------------------------------------------------------------


def open_session(repository: Path, model: str, version: str) -> ModelSession:
    """The served model.onnx in this process: CPU provider, onnxruntime's default thread count (as served)."""
    path = repository / model / version / "model.onnx"
    if not path.is_file():
        raise BenchError(f"no {path}: the in-process mode needs the model file the server serves")
    return ModelSession(path, SessionOptions(providers=(CPU,)))


async def bench_inprocess(
    session: ModelSession,
    workload: Workload,
    concurrency: int,
    *,
    duration: float | None = None,
    requests: int | None = None,
    images_per_request: int = 1,
    warmup: float = DEFAULT_WARMUP_SECONDS,
) -> LoadResult:
    """The same closed loop calling session.run from a pool of `concurrency` threads: no network."""
    feeds = [{workload.input_name: group} for group in _groups(workload.images, images_per_request)]
    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="bench-onnxruntime") as pool:

        def call(sequence: int) -> Awaitable[object]:
            return loop.run_in_executor(pool, session.run, feeds[sequence % len(feeds)])

        return await run_load(
            call,
            concurrency,
            duration=duration,
            requests=requests,
            warmup=warmup,
            images_per_request=images_per_request,
        )


def batch_throughput(session: ModelSession, workload: Workload, batch_size: int, seconds: float) -> float:
    """Images/s of back-to-back runs of `batch_size` rows, one at a time: the compute limit."""
    feeds = {workload.input_name: _groups(workload.images, batch_size)[0]}
    session.run(feeds)  # a new shape: onnxruntime allocates on its first run
    runs = 0
    start = time.perf_counter()
    while True:
        session.run(feeds)
        runs += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return runs * batch_size / elapsed


# --- server subprocesses -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    """`convserve serve` as a child process on a loopback port, logging to a file."""

    process: subprocess.Popen[bytes]
    target: str
    log_path: Path

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM (the server drains and exits), then SIGKILL if it takes too long."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(SERVER_STOP_SECONDS)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_server(repository: Path, log_path: Path, env: dict[str, str]) -> ServerProcess:
    """Start a server on a free port with metrics and repository polling off; does not wait."""
    port = free_port()
    # The caller's CONVSERVE_* settings would change what is measured: start from the defaults.
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CONVSERVE_")}
    command = [
        sys.executable, "-m", "service", "serve",
        "--model-repository", str(repository),
        "--host", "127.0.0.1",
        "--grpc-port", str(port),
        "--http-port", "-1",
        "--metrics-port", "-1",
    ]  # fmt: skip
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            command,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**clean, "CONVSERVE_REPOSITORY_POLL_SECONDS": "0", **env},
        )
    return ServerProcess(process, f"127.0.0.1:{port}", log_path)


def wait_until_serving(server: ServerProcess, timeout: float = SERVER_START_SECONDS) -> None:
    """Poll the readiness health entry until SERVING; fail with the server's log if it exits."""
    deadline = time.monotonic() + timeout
    with VisionClient(server.target, timeout=2) as client:
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                raise BenchError(f"server exited with {server.process.returncode}:\n{server.log_tail()}")
            try:
                if client.health() == "SERVING":
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise BenchError(f"server not SERVING after {timeout:.0f} s:\n{server.log_tail()}")


def served_batching(target: str, model: str) -> dict[str, Any]:
    """What the server really does for the model (KServe ModelConfig), and the provider it got."""
    with grpc.insecure_channel(target) as channel:
        stub = kserve_grpc.GRPCInferenceServiceStub(channel)
        config = stub.ModelConfig(kserve_pb2.ModelConfigRequest(name=model), timeout=10).config
    with VisionClient(target, timeout=10) as client:
        models = {m.name: m for m in client.list_models().models}
    versions = models[model].versions if model in models else []
    return {
        "max_batch_size": config.max_batch_size,
        "max_queue_delay_seconds": config.dynamic_batching.max_queue_delay_microseconds / 1e6,
        "provider": versions[0].provider if versions else "",
    }


# --- the comparison ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CompareOptions:
    repository: Path = Path("models")
    model: str = "lenet5"
    api: str = "task"
    concurrencies: tuple[int, ...] = COMPARE_CONCURRENCY
    repeats: int = COMPARE_REPEATS
    duration: float = COMPARE_DURATION_SECONDS
    warmup: float = DEFAULT_WARMUP_SECONDS
    images_per_request: int = 1
    channels: int = DEFAULT_CHANNELS
    timeout: float = DEFAULT_TIMEOUT_SECONDS
    batch_sizes: tuple[int, ...] = BATCH_SIZES


@dataclass(frozen=True)
class Point:
    repeat: int
    mode: str
    result: LoadResult


@dataclass(frozen=True)
class SweepPoint:
    repeat: int
    batch_size: int
    images_per_second: float


@dataclass(frozen=True)
class CompareReport:
    options: CompareOptions
    workload: str  # model, version and inputs, in words
    environment: dict[str, Any]
    servers: dict[str, dict[str, Any]]  # mode -> what the server really does
    points: list[Point]
    sweep: list[SweepPoint]

    def summary(self) -> dict[str, Any]:
        return summarize(self.points, self.sweep, self.options.concurrencies)

    def to_dict(self) -> dict[str, Any]:
        options = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self.options).items()}
        return {
            "options": options,
            "workload": self.workload,
            "environment": self.environment,
            "servers": self.servers,
            "points": [{"repeat": p.repeat, "mode": p.mode, **p.result.to_dict()} for p in self.points],
            "batch_sweep": [asdict(s) for s in self.sweep],
            "summary": self.summary(),
        }


Progress = Callable[[str], None]


def run_compare(options: CompareOptions, progress: Progress | None = None) -> CompareReport:
    """Start both servers, measure every point in interleaved order, stop the servers (always)."""
    say = progress or (lambda line: None)
    if not (options.repository / options.model).is_dir():
        raise BenchError(f"no model {options.model!r} in {options.repository} (run `make models` first)")
    servers: dict[str, ServerProcess] = {}
    with tempfile.TemporaryDirectory(prefix="convserve-bench-") as logs:
        try:
            say("starting servers: batching off (CONVSERVE_MAX_BATCH_SIZE=1) and on (defaults)")
            servers["off"] = start_server(
                options.repository, Path(logs) / "off.log", {"CONVSERVE_MAX_BATCH_SIZE": "1"}
            )
            servers["on"] = start_server(options.repository, Path(logs) / "on.log", {})
            for server in servers.values():
                wait_until_serving(server)
            served = {mode: served_batching(s.target, options.model) for mode, s in servers.items()}
            if served["off"]["max_batch_size"] != 1:
                say(
                    f"warning: the 'off' server batches up to {served['off']['max_batch_size']} rows "
                    "(does the model's config.yaml set batching?)"
                )
            return asyncio.run(_compare(options, servers, served, say))
        finally:
            for server in servers.values():
                server.stop()


async def _compare(
    options: CompareOptions,
    servers: dict[str, ServerProcess],
    served: dict[str, dict[str, Any]],
    say: Progress,
) -> CompareReport:
    channel = grpc.aio.insecure_channel(servers["on"].target)
    try:
        workload = await fetch_workload(channel, options.model, options.timeout)
    finally:
        await channel.close()
    session = open_session(options.repository, options.model, workload.version)
    served["inprocess"] = {"provider": session.provider}
    load = {
        "duration": options.duration,
        "images_per_request": options.images_per_request,
        "warmup": options.warmup,
    }
    points: list[Point] = []
    sweep: list[SweepPoint] = []
    for repeat in range(options.repeats):
        for concurrency in options.concurrencies:
            for mode in MODES:
                if mode == "inprocess":
                    result = await bench_inprocess(session, workload, concurrency, **load)
                else:
                    result = await bench_server(
                        servers[mode].target,
                        workload,
                        options.api,
                        concurrency,
                        channels=options.channels,
                        timeout=options.timeout,
                        **load,
                    )
                points.append(Point(repeat, mode, result))
                say(f"repeat {repeat + 1}/{options.repeats}  {_point_line(mode, result)}")
        seconds_each = max(options.duration / len(options.batch_sizes), 0.1)
        for size in options.batch_sizes:
            rate = await asyncio.to_thread(batch_throughput, session, workload, size, seconds_each)
            sweep.append(SweepPoint(repeat, size, rate))
        say(
            f"repeat {repeat + 1}/{options.repeats}  in-process batch sweep: "
            + _sweep_line(sweep[-len(options.batch_sizes) :])
        )
    return CompareReport(
        options=options,
        workload=f"{workload.model} version {workload.version}, {workload.source}",
        environment=_environment(),
        servers=served,
        points=points,
        sweep=sweep,
    )


def _environment() -> dict[str, Any]:
    from service.runtime import onnxruntime

    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "onnxruntime": onnxruntime().__version__,
        "grpcio": grpc.__version__,
    }


def _spread(values: Sequence[float]) -> dict[str, float | None]:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return {"median": None, "min": None, "max": None}
    return {"median": statistics.median(finite), "min": min(finite), "max": max(finite)}


def summarize(
    points: Sequence[Point], sweep: Sequence[SweepPoint], concurrencies: Sequence[int]
) -> dict[str, Any]:
    """Medians with min-max over repeats; on/off paired per repeat (they ran back to back)."""
    by_key: dict[tuple[str, int], list[LoadResult]] = {}
    for p in points:
        by_key.setdefault((p.mode, p.result.concurrency), []).append(p.result)
    rows = []
    for concurrency in concurrencies:
        for mode in MODES:
            results = by_key.get((mode, concurrency), [])
            errors: Counter[str] = Counter()
            for r in results:
                errors.update(r.errors)
            rows.append(
                {
                    "mode": mode,
                    "concurrency": concurrency,
                    "requests_per_second": _spread([r.requests_per_second for r in results]),
                    "images_per_second": _spread([r.images_per_second for r in results]),
                    "p50_ms": _spread([r.p50_ms for r in results]),
                    "p99_ms": _spread([r.p99_ms for r in results]),
                    "cpu_percent": _spread([r.cpu_percent for r in results]),
                    "errors": dict(errors),
                }
            )
    batching = []
    for concurrency in concurrencies:
        off, on = by_key.get(("off", concurrency), []), by_key.get(("on", concurrency), [])
        pairs = list(zip(off, on, strict=False))
        batching.append(
            {
                "concurrency": concurrency,
                "throughput_ratio": _spread(
                    [b.images_per_second / a.images_per_second for a, b in pairs if a.images_per_second > 0]
                ),
                "p50_difference_ms": _spread([b.p50_ms - a.p50_ms for a, b in pairs]),
            }
        )
    by_size: dict[int, list[float]] = {}
    for s in sweep:
        by_size.setdefault(s.batch_size, []).append(s.images_per_second)
    sizes = {size: _spread(rates) for size, rates in by_size.items()}
    best = max(sizes, key=lambda size: sizes[size]["median"] or 0.0) if sizes else None
    return {
        "points": rows,
        "batching": batching,
        "compute_limit": {"best_batch_size": best, "by_batch_size": sizes},
    }


# --- rendering -----------------------------------------------------------------------------------


def _fmt(spread: dict[str, float | None], digits: int, signed: bool = False) -> str:
    if spread["median"] is None:
        return "-"
    sign = "+" if signed else ""
    median, low, high = (f"{spread[k]:{sign}.{digits}f}" for k in ("median", "min", "max"))
    return f"{median} ({low} - {high})"


def render_markdown(report: CompareReport) -> str:
    """The comparison as Markdown: one table of points, one of on vs off, the compute limit."""
    options, summary = report.options, report.summary()
    on, off = report.servers.get("on", {}), report.servers.get("off", {})
    lines = [
        f"## {options.model}: batching off vs on vs in-process onnxruntime ({options.api} API)",
        "",
        f"Inputs: {report.workload}, {options.images_per_request} per request. "
        f"{options.repeats} repeat(s) of {options.duration:g} s per point "
        f"after {options.warmup:g} s warm-up, "
        "interleaved (per repeat, per concurrency: off, on, in-process). "
        "Figures are medians with (min - max) over repeats.",
        "",
        f"Servers: off max_batch_size {off.get('max_batch_size')}; "
        f"on max_batch_size {on.get('max_batch_size')}, "
        f"max_queue_delay {on.get('max_queue_delay_seconds')} s; provider {on.get('provider')}. "
        f"Machine: {report.environment['cpus']} CPUs, onnxruntime {report.environment['onnxruntime']}, "
        f"grpcio {report.environment['grpcio']}. Client CPU is the bench process "
        "(in-process mode: it includes the onnxruntime work).",
        "",
        "| concurrency | mode | requests/s | images/s | p50 ms | p99 ms | client CPU % | errors |",
        "|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in summary["points"]:
        errors = ", ".join(f"{code} {n}" for code, n in row["errors"].items()) or "0"
        lines.append(
            f"| {row['concurrency']} | {MODE_NAMES[row['mode']]} | {_fmt(row['requests_per_second'], 0)} "
            f"| {_fmt(row['images_per_second'], 0)} | {_fmt(row['p50_ms'], 2)} | {_fmt(row['p99_ms'], 2)} "
            f"| {_fmt(row['cpu_percent'], 0)} | {errors} |"
        )
    lines += [
        "",
        "| concurrency | throughput on/off | p50 on - off (ms) |",
        "|---:|---:|---:|",
    ]
    for row in summary["batching"]:
        lines.append(
            f"| {row['concurrency']} | {_fmt(row['throughput_ratio'], 2)} "
            f"| {_fmt(row['p50_difference_ms'], 2, signed=True)} |"
        )
    limit = summary["compute_limit"]
    if limit["best_batch_size"] is not None:
        best = limit["by_batch_size"][limit["best_batch_size"]]
        each = ", ".join(f"{size}: {s['median']:.0f}" for size, s in limit["by_batch_size"].items())
        lines += [
            "",
            f"In-process compute limit (one session.run at a time): best batch {limit['best_batch_size']}, "
            f"{_fmt(best, 0)} images/s. Median images/s by batch size: {each}.",
        ]
    return "\n".join(lines) + "\n"


def _point_line(mode: str, result: LoadResult) -> str:
    errors = sum(result.errors.values())
    return (
        f"concurrency {result.concurrency:>3}  {mode:<9}  {result.requests_per_second:8.0f} req/s  "
        f"{result.images_per_second:8.0f} img/s  p50 {result.p50_ms:6.2f} ms  p99 {result.p99_ms:6.2f} ms  "
        f"cpu {result.cpu_percent:4.0f}%  errors {errors}"
    )


def _sweep_line(sweep: Sequence[SweepPoint]) -> str:
    return ", ".join(f"batch {s.batch_size}: {s.images_per_second:.0f} img/s" for s in sweep)


def format_result(result: LoadResult) -> str:
    """A single run, for people."""
    errors = ", ".join(f"{code}: {n}" for code, n in result.errors.items()) or "none"
    return "\n".join(
        [
            f"  concurrency  {result.concurrency} ({result.requests} requests in {result.seconds:.2f} s)",
            f"  throughput   {result.requests_per_second:.1f} requests/s   "
            f"{result.images_per_second:.1f} images/s",
            f"  latency ms   p50 {result.p50_ms:.2f}   p90 {result.p90_ms:.2f}   p99 {result.p99_ms:.2f}",
            f"  errors       {errors}",
            f"  client CPU   {result.cpu_percent:.0f}% of one core",
        ]
    )


# --- command line ----------------------------------------------------------------------------------


def parse_concurrency(text: str) -> tuple[int, ...]:
    """ "16" or "1,16,64" -> (1, 16, 64); argparse type."""
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or N,N,..., got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"concurrency must be >= 1, got {text!r}")
    return values


def main(args: argparse.Namespace) -> int:
    """`convserve bench`: exit 0 when requests succeeded, 1 when none did or the bench could not run."""
    try:
        _check(args)
        return _compare_command(args) if args.compare else _bench_command(args)
    except (BenchError, grpc.RpcError, OSError) as exc:
        detail = f"{exc.code().name}: {exc.details()}" if isinstance(exc, grpc.RpcError) else str(exc)
        print(f"error: {detail}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _check(args: argparse.Namespace) -> None:
    """Refuse impossible flags with a message, before any server is started."""
    problems = [
        ("--duration must be > 0", args.duration is not None and args.duration <= 0),
        ("--requests must be >= 1", args.requests is not None and args.requests < 1),
        ("--images-per-request must be >= 1", args.images_per_request < 1),
        ("--warmup must be >= 0", args.warmup < 0),
        ("--channels must be >= 1", args.channels < 1),
        ("--repeats must be >= 1", args.repeats < 1),
        ("--compare measures --duration seconds per point, not --requests", args.compare and args.requests),
    ]
    for message, failed in problems:
        if failed:
            raise BenchError(message)


def _bench_command(args: argparse.Namespace) -> int:
    concurrencies = args.concurrency or (DEFAULT_CONCURRENCY,)
    duration = args.duration if args.requests is None else None
    if duration is None and args.requests is None:
        duration = DEFAULT_DURATION_SECONDS

    async def run() -> tuple[Workload, list[LoadResult]]:
        channel = grpc.aio.insecure_channel(args.target)
        try:
            workload = await fetch_workload(channel, args.model, args.timeout)
        finally:
            await channel.close()
        if args.json != "-":
            print(
                f"{workload.model} version {workload.version} via {args.api} at {args.target}: "
                f"{workload.source}, "
                f"{args.images_per_request} per request, {args.warmup:g} s warm-up, "
                + (
                    f"{duration:g} s per point"
                    if duration is not None
                    else f"{args.requests} requests per point"
                )
            )
        results = []
        for concurrency in concurrencies:
            result = await bench_server(
                args.target,
                workload,
                args.api,
                concurrency,
                duration=duration,
                requests=args.requests,
                images_per_request=args.images_per_request,
                warmup=args.warmup,
                channels=args.channels,
                timeout=args.timeout,
            )
            if args.json != "-":
                print(format_result(result), flush=True)
            results.append(result)
        return workload, results

    workload, results = asyncio.run(run())
    if args.json:
        record = {
            "target": args.target,
            "model": workload.model,
            "version": workload.version,
            "api": args.api,
            "inputs": workload.source,
            "images_per_request": args.images_per_request,
            "warmup_seconds": args.warmup,
            "results": [r.to_dict() for r in results],
        }
        _write_json(record, args.json)
    return 0 if all(r.requests > 0 for r in results) else 1


def _compare_command(args: argparse.Namespace) -> int:
    options = CompareOptions(
        repository=args.model_repository,
        model=args.model,
        api=args.api,
        concurrencies=args.concurrency or COMPARE_CONCURRENCY,
        repeats=args.repeats,
        duration=args.duration if args.duration is not None else COMPARE_DURATION_SECONDS,
        warmup=args.warmup,
        images_per_request=args.images_per_request,
        channels=args.channels,
        timeout=args.timeout,
    )
    report = run_compare(options, progress=lambda line: print(line, file=sys.stderr, flush=True))
    table = render_markdown(report)
    if args.markdown:
        Path(args.markdown).write_text(table)
    if args.json:
        _write_json(report.to_dict(), args.json)
    if args.json != "-":
        print(table, end="")
    return 0 if all(p.result.requests > 0 for p in report.points) else 1


def _write_json(record: dict[str, Any], destination: str) -> None:
    """`-` is stdout."""
    text = json.dumps(record, indent=2)
    if destination == "-":
        print(text)
    else:
        Path(destination).write_text(text + "\n")
