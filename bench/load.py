"""`convserve-bench`: a closed-loop load generator, and two interleaved comparisons.

Closed loop: each of `concurrency` workers sends its next request when the previous one answers,
so the offered load follows the server's speed and latency is not inflated by a client backlog.
A warm-up period runs first and is not counted. The generator reports its own CPU use (process
CPU seconds over wall seconds) because a saturated client caps throughput as surely as a server.

`--compare` starts two servers on the same repository, one with batching off (max_batch_size 1)
and one with the defaults, and measures them beside an onnxruntime session in this process, in
interleaved order (per repeat, per concurrency: off, on, in-process), so that drift on a noisy
machine hits every mode alike. `--transports` starts one server (defaults) and measures the same
KServe v2 inference over gRPC (raw tensors) and over HTTP/REST (binary tensor extension), in the
same interleaved way, so the cost of the transport is seen apart from the model's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.decoder import DecoderBenchError, DecoderStep, DecoderTimer, gains, image_counts
from service._proto.convserve.v1 import vision_pb2, vision_pb2_grpc
from service._proto.inference import grpc_predict_v2_pb2 as kserve_pb2
from service._proto.inference import grpc_predict_v2_pb2_grpc as kserve_grpc
from service.client import DEFAULT_TARGET, DEFAULT_TIMEOUT_SECONDS, VisionClient, to_image
from service.codecs.tensors import DATATYPES
from service.contract.preprocessing import levels_to_uint8, resize
from service.engine.sessions import CPU, ModelSession, SessionOptions
from service.transports.http.routes import HEADER_LENGTH

#: task: Classify over gRPC; kserve: ModelInfer over gRPC; http: KServe v2 infer over HTTP/REST.
APIS = ("task", "kserve", "http", "caption")
#: Where `--api http` goes without --target: the server's default HTTP port.
DEFAULT_HTTP_TARGET = "127.0.0.1:8000"
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
#: Modes of a transports comparison (they are API names), in the order each repeat runs them.
#: --compare --api caption: a captioner's beam search with iteration-level batching, or each request alone.
CAPTION_MODES = ("alone", "batched")
CAPTION_MODE_NAMES = {
    "alone": "each request decoded alone",
    "batched": "iteration-level batching",
}
CAPTION_CONCURRENCY = (1, 32)
CAPTION_IMAGES = 64
#: Seconds of decoder timing per repeat when the load points are counted in requests, not seconds.
DECODER_SWEEP_SECONDS = 3.0
TRANSPORTS = ("kserve", "http")
TRANSPORT_NAMES = {
    "kserve": "KServe v2 over gRPC (raw tensors)",
    "http": "KServe v2 over HTTP (binary tensors)",
}
#: Most distinct pre-built requests; they are reused round-robin, so building them costs nothing later.
MAX_DISTINCT_REQUESTS = 512
#: How many random inputs stand in for real images when the model's data is not available.
RANDOM_INPUTS = 256
DIGIT_MAX_LEVEL = 16  # scikit-learn's digits have grey levels 0..16
SERVER_START_SECONDS = 120.0
SERVER_STOP_SECONDS = 30.0


class BenchError(Exception):
    """A benchmark cannot run as asked; the message says why."""


class HTTPStatusError(Exception):
    """An HTTP answer other than 200, so the closed loop counts it by status ("HTTP 503")."""

    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


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
    server_cpu_percent: float = math.nan  # the server's CPU time over the window, when its pid is known

    @property
    def server_cpu_us_per_request(self) -> float:
        """Server CPU (all its threads) per answered request: what one request costs the server."""
        if self.requests == 0 or math.isnan(self.server_cpu_percent):
            return math.nan
        return self.server_cpu_percent / 100 * self.seconds / self.requests * 1e6

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
        record["server_cpu_us_per_request"] = _finite_or_none(self.server_cpu_us_per_request)
        return record


def _finite_or_none(value: Any) -> Any:
    """JSON has no NaN: a missing figure is null."""
    return None if isinstance(value, float) and math.isnan(value) else value


# --- the closed loop -----------------------------------------------------------------------------

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and all its threads so far (Linux /proc); nan elsewhere."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return math.nan
    fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": the comm may hold spaces
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # utime, stime


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
    """The status of one call: "OK", a gRPC status code name, "HTTP <status>" or an exception's type name."""
    try:
        await call(sequence)
    except grpc.aio.AioRpcError as exc:
        return exc.code().name
    except HTTPStatusError as exc:
        return str(exc)
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
    server_pid: int | None = None,
) -> LoadResult:
    """Drive `call` from `concurrency` workers for `duration` seconds or `requests` requests.

    Duration mode counts the requests answered inside the window (a closed loop's throughput);
    requests mode counts exactly the first `requests` requests sent after the warm-up. With
    `server_pid`, the server's CPU time over the same window is measured too.
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
        server_cpu_start = process_cpu_seconds(server_pid) if server_pid else math.nan
        start, cpu_start = time.perf_counter(), time.process_time()
        window.measuring = True
        if duration is not None:
            await asyncio.sleep(duration)
            window.end = time.perf_counter()
        else:
            await finished.wait()
        cpu_end = time.process_time()
        server_cpu = process_cpu_seconds(server_pid) - server_cpu_start if server_pid else math.nan
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
        server_cpu_percent=100 * server_cpu / seconds if seconds > 0 else math.nan,
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
    """scikit-learn's digits for lenet5 when scikit-learn is installed (the train extra), else random values.

    The digits go through the preprocessing the trainer uses (`service.contract`), so they are what
    lenet5 was trained on; the bench never imports the trainer itself.
    """
    shape = tuple(item_shape)
    if any(d < 0 for d in shape):
        raise BenchError(f"the model's input has free dimensions {list(shape)}; cannot make inputs for it")
    if model == "lenet5" and datatype == "UINT8" and len(shape) == 3 and shape[0] == 1:
        try:
            from sklearn.datasets import load_digits
        except ImportError:
            pass
        else:
            levels = load_digits().images  # (1797, 8, 8), grey levels 0..16
            native = levels_to_uint8(levels, DIGIT_MAX_LEVEL)
            images = np.stack([resize(digit, shape[1], shape[2]) for digit in native])[:, None]
            return images, f"{len(images)} scikit-learn digits"
    if datatype not in DATATYPES or datatype == "BYTES":
        raise BenchError(f"the model's input is {datatype}; only numeric inputs can be generated")
    dtype = DATATYPES[datatype].dtype
    images = np.random.default_rng(seed).integers(0, 256, size=(RANDOM_INPUTS, *shape)).astype(dtype)
    return images, f"{len(images)} random {datatype} inputs"


async def fetch_workload(channel: grpc.aio.Channel, model: str, timeout: float) -> Workload:
    """Ask the server (KServe ModelMetadata) for the model's input tensor, then pick the images."""
    stub = kserve_grpc.GRPCInferenceServiceStub(channel)
    metadata = await stub.ModelMetadata(kserve_pb2.ModelMetadataRequest(name=model), timeout=timeout)
    inputs = [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs]
    return _workload(model, inputs, list(metadata.versions))


def http_url(target: str) -> str:
    """host:port, or a full http:// URL, as the server's base URL (no trailing slash)."""
    return (target if "://" in target else f"http://{target}").rstrip("/")


async def fetch_workload_http(target: str, model: str, timeout: float) -> Workload:
    """The same through `GET /v2/models/{model}`, for a target that is only an HTTP port."""
    url = f"{http_url(target)}/v2/models/{quote(model, safe='')}"
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session,
        session.get(url) as response,
    ):
        body = await response.read()
    if response.status != 200:
        raise BenchError(f"GET {url}: HTTP {response.status} {body.decode(errors='replace')[:300]}")
    try:
        metadata = json.loads(body)
        inputs = [
            (str(t["name"]), str(t["datatype"]), [int(d) for d in t["shape"]]) for t in metadata["inputs"]
        ]
    except (ValueError, TypeError, KeyError) as exc:
        raise BenchError(f"GET {url}: not KServe v2 model metadata ({exc!r})") from None
    return _workload(model, inputs, [str(v) for v in metadata.get("versions", [])])


def _workload(model: str, inputs: Sequence[tuple[str, str, list[int]]], versions: Sequence[str]) -> Workload:
    """One input tensor with a free batch axis, whichever transport described it."""
    if len(inputs) != 1:
        names = [name for name, _, _ in inputs]
        raise BenchError(f"model {model!r} takes {len(names)} inputs {names}; bench sends one image tensor")
    ((name, datatype, shape),) = inputs
    if not shape or shape[0] != -1:
        raise BenchError(f"model {model!r} has no free batch axis (input shape {shape})")
    images, source = workload_images(model, shape[1:], datatype)
    return Workload(model, versions[0] if versions else "", name, datatype, images, source)


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


def scene_images(count: int = CAPTION_IMAGES, size: int = 64, seed: int = 0) -> np.ndarray:
    """(count, size, size, 3) uint8 pictures of one to three coloured shapes on a plain ground.

    Drawn here with Pillow (the server install has no trainer): close enough to the captioner's
    training scenes that it writes captions of typical length for them.
    """
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    colours = [(220, 40, 40), (40, 170, 60), (50, 80, 220), (230, 200, 40), (160, 60, 200), (250, 140, 30)]
    out = np.empty((count, size, size, 3), np.uint8)
    for i in range(count):
        picture = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(200, 256, 3)))
        draw = ImageDraw.Draw(picture)
        for _ in range(int(rng.integers(1, 4))):
            side = int(rng.integers(size // 6, size // 3))
            left, top = (int(v) for v in rng.integers(0, size - side, 2))
            box = (left, top, left + side, top + side)
            colour = colours[int(rng.integers(len(colours)))]
            shape = int(rng.integers(3))
            if shape == 0:
                draw.rectangle(box, fill=colour)
            elif shape == 1:
                draw.ellipse(box, fill=colour)
            else:
                draw.polygon(
                    [(left + side // 2, top), (left, top + side), (left + side, top + side)], fill=colour
                )
        out[i] = np.asarray(picture)
    return out


async def caption_workload(target: str, model: str, timeout: float) -> Workload:
    """A captioner's newest version (KServe ModelMetadata) and drawn scenes to caption."""
    channel = grpc.aio.insecure_channel(target)
    try:
        stub = kserve_grpc.GRPCInferenceServiceStub(channel)
        metadata = await stub.ModelMetadata(kserve_pb2.ModelMetadataRequest(name=model), timeout=timeout)
    finally:
        await channel.close()
    images = scene_images()
    version = metadata.versions[0] if metadata.versions else ""
    return Workload(model, version, "image", "UINT8", images, f"{len(images)} drawn scenes (raw RGB 64x64)")


def caption_requests(workload: Workload, per_request: int, beam_size: int | None = None) -> list[Any]:
    """Caption requests (the model's defaults: beam size, max length; one caption per image)."""
    requests = []
    for group in _groups(workload.images, per_request):
        request = vision_pb2.CaptionRequest(model=workload.model, images=[to_image(i) for i in group])
        if beam_size is not None:
            request.beam_size = beam_size
        requests.append(request)
    return requests


def kserve_requests(workload: Workload, per_request: int) -> list[kserve_pb2.ModelInferRequest]:
    requests = []
    for group in _groups(workload.images, per_request):
        request = kserve_pb2.ModelInferRequest(model_name=workload.model)
        request.inputs.add(name=workload.input_name, datatype=workload.datatype, shape=group.shape)
        request.raw_input_contents.append(group.tobytes())
        requests.append(request)
    return requests


def http_requests(workload: Workload, per_request: int) -> list[tuple[bytes, dict[str, str]]]:
    """Bodies and headers for `POST /v2/models/{model}/infer` with the binary tensor extension.

    The body is a JSON header followed by the raw tensor, as `kserve_requests` sends it over gRPC,
    and the outputs are asked for in binary too, so neither side spends time on JSON numbers.
    """
    requests = []
    for group in _groups(workload.images, per_request):
        tensor = {
            "name": workload.input_name,
            "datatype": workload.datatype,
            "shape": list(group.shape),
            "parameters": {"binary_data_size": group.nbytes},
        }
        header = json.dumps({"inputs": [tensor], "parameters": {"binary_data_output": True}}).encode()
        headers = {HEADER_LENGTH: str(len(header)), "Content-Type": "application/octet-stream"}
        requests.append((header + group.tobytes(), headers))
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
    server_pid: int | None = None,
) -> LoadResult:
    """Closed-loop load on a running server: the task API (Classify) or KServe v2 over gRPC or HTTP.

    `target` is host:port of the gRPC port, or of the HTTP port for `api="http"`; with
    `server_pid` (a server on this machine) the result has the server's CPU use too.
    """
    if api not in APIS:
        raise ValueError(f"api must be one of {APIS}, got {api!r}")
    if api == "http":
        return await bench_http(
            target,
            workload,
            concurrency,
            duration=duration,
            requests=requests,
            images_per_request=images_per_request,
            warmup=warmup,
            timeout=timeout,
            server_pid=server_pid,
        )
    opened = open_channels(target, max(1, min(channels, concurrency)))
    try:
        if api == "task":
            stubs: list[Any] = [vision_pb2_grpc.VisionStub(c) for c in opened]
            messages: list[Any] = task_requests(workload, images_per_request)
            method = "Classify"
        elif api == "caption":
            stubs = [vision_pb2_grpc.VisionStub(c) for c in opened]
            messages = caption_requests(workload, images_per_request)
            method = "Caption"
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
            server_pid=server_pid,
        )
    finally:
        await asyncio.gather(*(c.close() for c in opened))


async def bench_http(
    target: str,
    workload: Workload,
    concurrency: int = DEFAULT_CONCURRENCY,
    *,
    duration: float | None = None,
    requests: int | None = None,
    images_per_request: int = 1,
    warmup: float = DEFAULT_WARMUP_SECONDS,
    timeout: float = DEFAULT_TIMEOUT_SECONDS,
    server_pid: int | None = None,
) -> LoadResult:
    """Closed-loop KServe v2 inference over HTTP/REST, binary tensors in and out.

    One keep-alive connection per worker at most (HTTP/1.1 carries one request at a time), and the
    deadline travels as the `timeout` query parameter, as gRPC sends its deadline to the server.
    Each answer is read in full and its JSON header parsed, as a client would.
    """
    url = f"{http_url(target)}/v2/models/{quote(workload.model, safe='')}/infer?timeout={timeout:g}"
    messages = http_requests(workload, images_per_request)
    connector = aiohttp.TCPConnector(limit=concurrency)  # keep-alive is aiohttp's default
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)
    ) as session:

        async def call(sequence: int) -> object:
            body, headers = messages[sequence % len(messages)]
            async with session.post(url, data=body, headers=headers) as response:
                answer = await response.read()
                if response.status != 200:
                    raise HTTPStatusError(response.status)
                return json.loads(answer[: int(response.headers.get(HEADER_LENGTH, len(answer)))])

        return await run_load(
            call,
            concurrency,
            duration=duration,
            requests=requests,
            warmup=warmup,
            images_per_request=images_per_request,
            server_pid=server_pid,
        )


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


def free_ports(count: int) -> list[int]:
    """`count` distinct free loopback ports: all bound at once, so none is handed out twice."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


@dataclass
class ServerProcess:
    """`convserve serve` as a child process on loopback gRPC and HTTP ports, logging to a file."""

    process: subprocess.Popen[bytes]
    target: str  # gRPC host:port
    log_path: Path
    http_target: str  # HTTP host:port

    def target_for(self, api: str) -> str:
        """Where `api` is served: the HTTP port for http, else the gRPC port."""
        return self.http_target if api == "http" else self.target

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
    """Start a server on free gRPC and HTTP ports with metrics and repository polling off; does not wait."""
    port, http_port = free_ports(2)
    # The caller's CONVSERVE_* settings would change what is measured: start from the defaults.
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CONVSERVE_")}
    command = [
        sys.executable, "-m", "service", "serve",
        "--model-repository", str(repository),
        "--host", "127.0.0.1",
        "--grpc-port", str(port),
        "--http-port", str(http_port),
        "--metrics-port", "-1",
    ]  # fmt: skip
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            command,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**clean, "CONVSERVE_REPOSITORY_POLL_SECONDS": "0", **env},
        )
    return ServerProcess(process, f"127.0.0.1:{port}", log_path, f"127.0.0.1:{http_port}")


def wait_until_serving(
    server: ServerProcess, timeout: float = SERVER_START_SECONDS, poll_seconds: float = 0.2
) -> None:
    """Poll the readiness health entry until SERVING; fail with the server's log if it exits.

    The channel retries a refused connection every 20-50 ms instead of gRPC's default backoff
    (up to seconds), so the time to SERVING is seen as it is (the bench suite reports it).
    """
    deadline = time.monotonic() + timeout
    options = [("grpc.initial_reconnect_backoff_ms", 20), ("grpc.max_reconnect_backoff_ms", 50)]
    with grpc.insecure_channel(server.target, options=options) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                raise BenchError(f"server exited with {server.process.returncode}:\n{server.log_tail()}")
            try:
                answer = stub.Check(health_pb2.HealthCheckRequest(), timeout=2, wait_for_ready=True)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(poll_seconds)
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


# --- the comparisons -----------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadOptions:
    """What every comparison shares: the repository and model it serves, and the load at each point."""

    repository: Path = Path("models")
    model: str = "lenet5"
    concurrencies: tuple[int, ...] = COMPARE_CONCURRENCY
    repeats: int = COMPARE_REPEATS
    duration: float = COMPARE_DURATION_SECONDS
    warmup: float = DEFAULT_WARMUP_SECONDS
    images_per_request: int = 1
    channels: int = DEFAULT_CHANNELS
    timeout: float = DEFAULT_TIMEOUT_SECONDS


@dataclass(frozen=True)
class CompareOptions(LoadOptions):
    """--compare also chooses the API both servers are called through and the in-process batch sizes."""

    api: str = "task"
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


def _report_dict(
    options: LoadOptions, workload: str, environment: dict[str, Any], points: Sequence[Point]
) -> dict[str, Any]:
    """The JSON every comparison report starts with."""
    return {
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(options).items()},
        "workload": workload,
        "environment": environment,
        "points": [{"repeat": p.repeat, "mode": p.mode, **p.result.to_dict()} for p in points],
    }


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
        return {
            **_report_dict(self.options, self.workload, self.environment, self.points),
            "servers": self.servers,
            "batch_sweep": [asdict(s) for s in self.sweep],
            "summary": self.summary(),
        }


@dataclass(frozen=True)
class TransportsReport:
    options: LoadOptions
    workload: str  # model, version and inputs, in words
    environment: dict[str, Any]
    server: dict[str, Any]  # what the server really does
    points: list[Point]  # mode is the API: kserve (gRPC) or http

    def summary(self) -> dict[str, Any]:
        return summarize_transports(self.points, self.options.concurrencies)

    def to_dict(self) -> dict[str, Any]:
        return {
            **_report_dict(self.options, self.workload, self.environment, self.points),
            "server": self.server,
            "summary": self.summary(),
        }


Progress = Callable[[str], None]


def _check_repository(options: LoadOptions) -> None:
    if not (options.repository / options.model).is_dir():
        raise BenchError(f"no model {options.model!r} in {options.repository} (run `make models` first)")


@contextlib.contextmanager
def serving(repository: Path, envs: dict[str, dict[str, str]]) -> Iterator[dict[str, ServerProcess]]:
    """One server per name (with its settings), all SERVING; all stopped on the way out, whatever happens."""
    servers: dict[str, ServerProcess] = {}
    with tempfile.TemporaryDirectory(prefix="convserve-bench-") as logs:
        try:
            for name, env in envs.items():
                servers[name] = start_server(repository, Path(logs) / f"{name}.log", env)
            for server in servers.values():
                wait_until_serving(server)
            yield servers
        finally:
            for server in servers.values():
                server.stop()


async def workload_at(target: str, model: str, timeout: float, api: str = "kserve") -> Workload:
    """The workload, asked of the server through the port `api` uses (HTTP for http, else gRPC)."""
    if api == "caption":
        return await caption_workload(target, model, timeout)
    if api == "http":
        return await fetch_workload_http(target, model, timeout)
    channel = grpc.aio.insecure_channel(target)
    try:
        return await fetch_workload(channel, model, timeout)
    finally:
        await channel.close()


def _load(options: LoadOptions) -> dict[str, Any]:
    """How long and how much each point measures, as bench_server and bench_inprocess take it."""
    return {
        "duration": options.duration,
        "images_per_request": options.images_per_request,
        "warmup": options.warmup,
    }


def describe_workload(workload: Workload) -> str:
    return f"{workload.model} version {workload.version}, {workload.source}"


def run_compare(options: CompareOptions, progress: Progress | None = None) -> CompareReport:
    """Start both servers, measure every point in interleaved order, stop the servers (always)."""
    say = progress or (lambda line: None)
    _check_repository(options)
    say("starting servers: batching off (CONVSERVE_MAX_BATCH_SIZE=1) and on (defaults)")
    with serving(options.repository, {"off": {"CONVSERVE_MAX_BATCH_SIZE": "1"}, "on": {}}) as servers:
        served = {mode: served_batching(s.target, options.model) for mode, s in servers.items()}
        if served["off"]["max_batch_size"] != 1:
            say(
                f"warning: the 'off' server batches up to {served['off']['max_batch_size']} rows "
                "(does the model's config.yaml set batching?)"
            )
        return asyncio.run(_compare(options, servers, served, say))


async def _compare(
    options: CompareOptions,
    servers: dict[str, ServerProcess],
    served: dict[str, dict[str, Any]],
    say: Progress,
) -> CompareReport:
    workload = await workload_at(servers["on"].target, options.model, options.timeout)
    session = open_session(options.repository, options.model, workload.version)
    served["inprocess"] = {"provider": session.provider}
    points: list[Point] = []
    sweep: list[SweepPoint] = []
    for repeat in range(options.repeats):
        for concurrency in options.concurrencies:
            for mode in MODES:
                if mode == "inprocess":
                    result = await bench_inprocess(session, workload, concurrency, **_load(options))
                else:
                    result = await bench_server(
                        servers[mode].target_for(options.api),
                        workload,
                        options.api,
                        concurrency,
                        channels=options.channels,
                        timeout=options.timeout,
                        **_load(options),
                    )
                points.append(Point(repeat, mode, result))
                say(f"repeat {repeat + 1}/{options.repeats}  {point_line(mode, result)}")
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
        workload=describe_workload(workload),
        environment=environment(),
        servers=served,
        points=points,
        sweep=sweep,
    )


def run_transports(options: LoadOptions, progress: Progress | None = None) -> TransportsReport:
    """Start one server (defaults), measure gRPC and HTTP at every point in interleaved order, stop it."""
    say = progress or (lambda line: None)
    _check_repository(options)
    say("starting a server (defaults, batching on) on free gRPC and HTTP ports")
    with serving(options.repository, {"server": {}}) as servers:
        server = servers["server"]
        served = served_batching(server.target, options.model)
        return asyncio.run(_transports(options, server, served, say))


async def _transports(
    options: LoadOptions, server: ServerProcess, served: dict[str, Any], say: Progress
) -> TransportsReport:
    workload = await workload_at(server.target, options.model, options.timeout)
    points: list[Point] = []
    for repeat in range(options.repeats):
        for concurrency in options.concurrencies:
            for api in TRANSPORTS:
                result = await bench_server(
                    server.target_for(api),
                    workload,
                    api,
                    concurrency,
                    channels=options.channels,
                    timeout=options.timeout,
                    **_load(options),
                )
                points.append(Point(repeat, api, result))
                say(f"repeat {repeat + 1}/{options.repeats}  {point_line(api, result)}")
    return TransportsReport(
        options=options,
        workload=describe_workload(workload),
        environment=environment(),
        server=served,
        points=points,
    )


@dataclass(frozen=True)
class CaptionReport:
    options: LoadOptions
    workload: str
    environment: dict[str, Any]
    servers: dict[str, dict[str, Any]]  # mode -> settings and the captions' mean length
    points: list[Point]
    decoder_steps: list[DecoderStep]  # the decoder graph alone, in this process: the ceiling

    def summary(self) -> dict[str, Any]:
        concurrencies = self.options.concurrencies
        return {
            "points": point_rows(self.points, concurrencies, CAPTION_MODES),
            "batching": paired(self.points, concurrencies, "alone", "batched"),
            "decoder_steps": decoder_step_rows(self.decoder_steps),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            **_report_dict(self.options, self.workload, self.environment, self.points),
            "servers": self.servers,
            "decoder_steps": [asdict(step) for step in self.decoder_steps],
            "summary": self.summary(),
        }


def decoder_step_rows(steps: Sequence[DecoderStep]) -> list[dict[str, Any]]:
    """Per image count: its rows, the step's time and the gain over one image per step, over repeats."""
    by_images: dict[int, list[DecoderStep]] = {}
    for step in steps:
        by_images.setdefault(step.images, []).append(step)
    gain = gains(steps)
    return [
        {
            "images": images,
            "rows": statistics.median(step.rows for step in group),
            "step_ms": spread([step.seconds * 1e3 for step in group]),
            "gain": spread(gain.get(images, [])),
        }
        for images, group in sorted(by_images.items())
    ]


def run_caption_compare(options: LoadOptions, progress: Progress | None = None) -> CaptionReport:
    """Two servers: beam search with iteration-level batching (default) and each request decoded alone."""
    say = progress or (lambda line: None)
    _check_repository(options)
    say("starting servers: each caption request decoded alone (CONVSERVE_CAPTION_BATCHING=0) and batched")
    envs = {"alone": {"CONVSERVE_CAPTION_BATCHING": "0"}, "batched": {}}
    with serving(options.repository, envs) as servers:
        return asyncio.run(_caption_compare(options, servers, say))


async def _caption_compare(
    options: LoadOptions, servers: dict[str, ServerProcess], say: Progress
) -> CaptionReport:
    workload = await caption_workload(servers["batched"].target, options.model, options.timeout)
    try:
        timer = DecoderTimer(options.repository, options.model, workload.version)
    except DecoderBenchError as exc:
        raise BenchError(str(exc)) from exc
    counts = image_counts(min(max(options.concurrencies), len(workload.images)))
    searches = await asyncio.to_thread(timer.searches_one_step_in, workload.images[: counts[-1]])
    served: dict[str, dict[str, Any]] = {}
    for mode, server in servers.items():  # the same captions either way: their length sets the work
        with VisionClient(server.target, timeout=60) as client:
            response = await asyncio.to_thread(client.caption, list(workload.images), options.model)
        lengths = [len(r.captions[0].words) for r in response.results]
        served[mode] = {
            "caption_batching": mode == "batched",
            "mean_caption_words": statistics.fmean(lengths),
            "example": response.results[0].captions[0].text,
        }
    say(
        f"captions: {served['batched']['mean_caption_words']:.1f} words on average, e.g. "
        f"{served['batched']['example']!r}"
    )
    points: list[Point] = []
    decoder_steps: list[DecoderStep] = []
    for repeat in range(options.repeats):
        for concurrency in options.concurrencies:
            for mode in CAPTION_MODES:
                result = await bench_server(
                    servers[mode].target,
                    workload,
                    "caption",
                    concurrency,
                    channels=options.channels,
                    timeout=options.timeout,
                    **_load(options),
                )
                points.append(Point(repeat, mode, result))
                say(f"repeat {repeat + 1}/{options.repeats}  {point_line(mode, result)}")
        seconds = options.duration or DECODER_SWEEP_SECONDS
        swept = await asyncio.to_thread(timer.sweep, searches, counts, seconds, repeat)
        decoder_steps += swept
        say(f"repeat {repeat + 1}/{options.repeats}  decoder alone: " + _decoder_line(swept))
    return CaptionReport(options, describe_workload(workload), environment(), served, points, decoder_steps)


def _decoder_line(steps: Sequence[DecoderStep]) -> str:
    return ", ".join(f"{s.images} images {s.seconds * 1e3:.2f} ms" for s in steps)


def render_caption_markdown(report: CaptionReport) -> str:
    options, summary = report.options, report.summary()
    words = report.servers.get("batched", {}).get("mean_caption_words", 0.0)
    lines = [
        f"## {options.model}: beam search with iteration-level batching vs each request decoded alone",
        "",
        _method(report.workload, options, "alone, then batched"),
        "",
        f"Caption RPC, the model's default beam size and max length, one image per request; captions "
        f"{words:.1f} words on average. images/s is captions/s. {_machine(report.environment)}",
        "",
        *_points_table(summary["points"], CAPTION_MODE_NAMES),
        "",
        *_paired_table(summary["batching"], "alone", "batched"),
        "",
        "The decoder graph alone, in this process (no server): one step over the live hypotheses of N "
        "images (a beam each, one step in), and the images/s it gains over one image per step. "
        "That is about the most iteration-level batching can gain on this machine.",
        "",
        "| images per step | rows | step ms | gain over one image per step |",
        "|---:|---:|---:|---:|",
        *(
            f"| {row['images']} | {row['rows']:.0f} | {format_spread(row['step_ms'], 3)} "
            f"| {format_spread(row['gain'], 2)} |"
            for row in summary["decoder_steps"]
        ),
    ]
    return "\n".join(lines) + "\n"


def environment() -> dict[str, Any]:
    from service.engine.sessions import onnxruntime

    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "onnxruntime": onnxruntime().__version__,
        "grpcio": grpc.__version__,
        "aiohttp": aiohttp.__version__,
    }


def spread(values: Sequence[float]) -> dict[str, float | None]:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return {"median": None, "min": None, "max": None}
    return {"median": statistics.median(finite), "min": min(finite), "max": max(finite)}


def _by_point(points: Sequence[Point]) -> dict[tuple[str, int], list[LoadResult]]:
    """(mode, concurrency) -> its results, in repeat order."""
    by_key: dict[tuple[str, int], list[LoadResult]] = {}
    for p in points:
        by_key.setdefault((p.mode, p.result.concurrency), []).append(p.result)
    return by_key


def point_rows(
    points: Sequence[Point], concurrencies: Sequence[int], modes: Sequence[str]
) -> list[dict[str, Any]]:
    """Per concurrency and mode: medians with min-max over repeats, and the errors of all repeats."""
    by_key = _by_point(points)
    rows = []
    for concurrency in concurrencies:
        for mode in modes:
            results = by_key.get((mode, concurrency), [])
            errors: Counter[str] = Counter()
            for r in results:
                errors.update(r.errors)
            rows.append(
                {
                    "mode": mode,
                    "concurrency": concurrency,
                    "requests_per_second": spread([r.requests_per_second for r in results]),
                    "images_per_second": spread([r.images_per_second for r in results]),
                    "p50_ms": spread([r.p50_ms for r in results]),
                    "p99_ms": spread([r.p99_ms for r in results]),
                    "cpu_percent": spread([r.cpu_percent for r in results]),
                    "errors": dict(errors),
                }
            )
    return rows


def paired(
    points: Sequence[Point], concurrencies: Sequence[int], base: str, other: str
) -> list[dict[str, Any]]:
    """`other` over `base`, paired per repeat (they ran back to back, so drift mostly cancels)."""
    by_key = _by_point(points)
    rows = []
    for concurrency in concurrencies:
        pairs = list(
            zip(by_key.get((base, concurrency), []), by_key.get((other, concurrency), []), strict=False)
        )
        rows.append(
            {
                "concurrency": concurrency,
                "throughput_ratio": spread(
                    [b.images_per_second / a.images_per_second for a, b in pairs if a.images_per_second > 0]
                ),
                "p50_difference_ms": spread([b.p50_ms - a.p50_ms for a, b in pairs]),
            }
        )
    return rows


def summarize(
    points: Sequence[Point], sweep: Sequence[SweepPoint], concurrencies: Sequence[int]
) -> dict[str, Any]:
    """Medians with min-max over repeats; on/off paired per repeat (they ran back to back)."""
    by_size: dict[int, list[float]] = {}
    for s in sweep:
        by_size.setdefault(s.batch_size, []).append(s.images_per_second)
    sizes = {size: spread(rates) for size, rates in by_size.items()}
    best = max(sizes, key=lambda size: sizes[size]["median"] or 0.0) if sizes else None
    return {
        "points": point_rows(points, concurrencies, MODES),
        "batching": paired(points, concurrencies, "off", "on"),
        "compute_limit": {"best_batch_size": best, "by_batch_size": sizes},
    }


def summarize_transports(points: Sequence[Point], concurrencies: Sequence[int]) -> dict[str, Any]:
    """Medians with min-max over repeats; HTTP over gRPC paired per repeat."""
    return {
        "points": point_rows(points, concurrencies, TRANSPORTS),
        "http_vs_grpc": paired(points, concurrencies, "kserve", "http"),
    }


# --- rendering -----------------------------------------------------------------------------------


def format_spread(spread: dict[str, float | None], digits: int, signed: bool = False) -> str:
    if spread["median"] is None:
        return "-"
    sign = "+" if signed else ""
    median, low, high = (f"{spread[k]:{sign}.{digits}f}" for k in ("median", "min", "max"))
    return f"{median} ({low} - {high})"


def _method(workload: str, options: LoadOptions, order: str) -> str:
    """How the figures were taken, in one paragraph."""
    return (
        f"Inputs: {workload}, {options.images_per_request} per request. "
        f"{options.repeats} repeat(s) of {options.duration:g} s per point "
        f"after {options.warmup:g} s warm-up, "
        f"interleaved (per repeat, per concurrency: {order}). "
        "Figures are medians with (min - max) over repeats."
    )


def _machine(environment: dict[str, Any]) -> str:
    return (
        f"Machine: {environment['cpus']} CPUs, onnxruntime {environment['onnxruntime']}, "
        f"grpcio {environment['grpcio']}, aiohttp {environment.get('aiohttp')}."
    )


def _points_table(rows: Sequence[dict[str, Any]], names: dict[str, str]) -> list[str]:
    lines = [
        "| concurrency | mode | requests/s | images/s | p50 ms | p99 ms | client CPU % | errors |",
        "|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        errors = ", ".join(f"{code} {n}" for code, n in row["errors"].items()) or "0"
        lines.append(
            f"| {row['concurrency']} | {names[row['mode']]} | {format_spread(row['requests_per_second'], 0)} "
            f"| {format_spread(row['images_per_second'], 0)} | {format_spread(row['p50_ms'], 2)} "
            f"| {format_spread(row['p99_ms'], 2)} "
            f"| {format_spread(row['cpu_percent'], 0)} | {errors} |"
        )
    return lines


def _paired_table(rows: Sequence[dict[str, Any]], base: str, other: str) -> list[str]:
    lines = [
        f"| concurrency | throughput {other}/{base} | p50 {other} - {base} (ms) |",
        "|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['concurrency']} | {format_spread(row['throughput_ratio'], 2)} "
            f"| {format_spread(row['p50_difference_ms'], 2, signed=True)} |"
        )
    return lines


def render_markdown(report: CompareReport) -> str:
    """The comparison as Markdown: one table of points, one of on vs off, the compute limit."""
    options, summary = report.options, report.summary()
    on, off = report.servers.get("on", {}), report.servers.get("off", {})
    lines = [
        f"## {options.model}: batching off vs on vs in-process onnxruntime ({options.api} API)",
        "",
        _method(report.workload, options, "off, on, in-process"),
        "",
        f"Servers: off max_batch_size {off.get('max_batch_size')}; "
        f"on max_batch_size {on.get('max_batch_size')}, "
        f"max_queue_delay {on.get('max_queue_delay_seconds')} s; provider {on.get('provider')}. "
        f"{_machine(report.environment)} Client CPU is the bench process "
        "(in-process mode: it includes the onnxruntime work).",
        "",
        *_points_table(summary["points"], MODE_NAMES),
        "",
        *_paired_table(summary["batching"], "off", "on"),
    ]
    limit = summary["compute_limit"]
    if limit["best_batch_size"] is not None:
        best = limit["by_batch_size"][limit["best_batch_size"]]
        each = ", ".join(f"{size}: {s['median']:.0f}" for size, s in limit["by_batch_size"].items())
        lines += [
            "",
            f"In-process compute limit (one session.run at a time): best batch {limit['best_batch_size']}, "
            f"{format_spread(best, 0)} images/s. Median images/s by batch size: {each}.",
        ]
    return "\n".join(lines) + "\n"


def render_transports_markdown(report: TransportsReport) -> str:
    """The transports comparison as Markdown: one table of points, one of HTTP vs gRPC."""
    options, summary, server = report.options, report.summary(), report.server
    lines = [
        f"## {options.model}: KServe v2 over gRPC vs over HTTP (one server, batching on)",
        "",
        _method(report.workload, options, "gRPC, then HTTP"),
        "",
        f"Server: max_batch_size {server.get('max_batch_size')}, "
        f"max_queue_delay {server.get('max_queue_delay_seconds')} s; provider {server.get('provider')}. "
        f"gRPC: ModelInfer with raw_input_contents over up to {options.channels} channels (connections) "
        "shared by the workers. HTTP: POST /v2/models/{model}/infer, JSON header and binary tensors both "
        "ways, one keep-alive connection per worker (aiohttp). "
        f"{_machine(report.environment)} Client CPU is the bench process.",
        "",
        *_points_table(summary["points"], TRANSPORT_NAMES),
        "",
        *_paired_table(summary["http_vs_grpc"], "gRPC", "HTTP"),
    ]
    return "\n".join(lines) + "\n"


def point_line(mode: str, result: LoadResult) -> str:
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
    """`convserve-bench`: exit 0 when requests succeeded, 1 when none did or the bench could not run."""
    try:
        _check(args)
        if args.suite:
            return _suite_command(args)
        if args.compare:
            return _compare_command(args)
        return _transports_command(args) if args.transports else _bench_command(args)
    except (BenchError, grpc.RpcError, aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        detail = f"{exc.code().name}: {exc.details()}" if isinstance(exc, grpc.RpcError) else str(exc)
        print(f"error: {detail or type(exc).__name__}", file=sys.stderr)
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
        (
            "--compare, --transports and --suite are separate runs: choose one",
            sum((args.compare, args.transports, args.suite)) > 1,
        ),
        (
            "--compare, --transports and --suite measure --duration seconds per point, not --requests",
            (args.compare or args.transports or args.suite) and args.requests,
        ),
        ("--models is for --suite", args.models is not None and not args.suite),
    ]
    for message, failed in problems:
        if failed:
            raise BenchError(message)


def _bench_command(args: argparse.Namespace) -> int:
    concurrencies = args.concurrency or (DEFAULT_CONCURRENCY,)
    duration = args.duration if args.requests is None else None
    if duration is None and args.requests is None:
        duration = DEFAULT_DURATION_SECONDS
    target = args.target or (DEFAULT_HTTP_TARGET if args.api == "http" else DEFAULT_TARGET)

    async def run() -> tuple[Workload, list[LoadResult]]:
        workload = await workload_at(target, args.model, args.timeout, args.api)
        if args.json != "-":
            print(
                f"{workload.model} version {workload.version} via {args.api} at {target}: "
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
                target,
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
            "target": target,
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


def _load_options(args: argparse.Namespace) -> dict[str, Any]:
    """The flags every comparison takes, as LoadOptions fields."""
    return {
        "repository": args.model_repository,
        "model": args.model,
        "concurrencies": args.concurrency or COMPARE_CONCURRENCY,
        "repeats": args.repeats,
        "duration": args.duration if args.duration is not None else COMPARE_DURATION_SECONDS,
        "warmup": args.warmup,
        "images_per_request": args.images_per_request,
        "channels": args.channels,
        "timeout": args.timeout,
    }


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _compare_command(args: argparse.Namespace) -> int:
    if args.api == "caption":
        options = _load_options(args)
        options["concurrencies"] = args.concurrency or CAPTION_CONCURRENCY
        caption_report = run_caption_compare(LoadOptions(**options), progress=_progress)
        return _report(
            args, caption_report.to_dict(), render_caption_markdown(caption_report), caption_report.points
        )
    report = run_compare(CompareOptions(api=args.api, **_load_options(args)), progress=_progress)
    return _report(args, report.to_dict(), render_markdown(report), report.points)


def _transports_command(args: argparse.Namespace) -> int:
    report = run_transports(LoadOptions(**_load_options(args)), progress=_progress)
    return _report(args, report.to_dict(), render_transports_markdown(report), report.points)


def _suite_command(args: argparse.Namespace) -> int:
    from bench import suite as bench_suite  # it builds on this module

    options = bench_suite.SuiteOptions(
        repository=args.model_repository,
        models=args.models or bench_suite.SUITE_MODELS,
        concurrencies=args.concurrency or bench_suite.SUITE_CONCURRENCY,
        repeats=args.repeats,
        duration=args.duration if args.duration is not None else COMPARE_DURATION_SECONDS,
        warmup=args.warmup,
        channels=args.channels,
        timeout=args.timeout,
    )
    report = bench_suite.run_suite(options, progress=_progress)
    points = [Point(p.repeat, p.target, p.result) for p in report.points]
    return _report(args, report.to_dict(), bench_suite.render_markdown(report), points)


def _report(args: argparse.Namespace, record: dict[str, Any], table: str, points: Sequence[Point]) -> int:
    """Write and print a comparison; exit 0 only when every point had successful requests."""
    if args.markdown:
        Path(args.markdown).write_text(table)
    if args.json:
        _write_json(record, args.json)
    if args.json != "-":
        print(table, end="")
    return 0 if all(p.result.requests > 0 for p in points) else 1


def _write_json(record: dict[str, Any], destination: str) -> None:
    """`-` is stdout."""
    text = json.dumps(record, indent=2)
    if destination == "-":
        print(text)
    else:
        Path(destination).write_text(text + "\n")
