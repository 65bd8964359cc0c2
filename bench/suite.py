"""`convserve-bench --suite` (`make bench`): convserve beside reference servers and its limits, in one run.

- The frozen reference servers of `bench.reference`, on stock grpc.aio and stock aiohttp: a no-op
  server (the transport alone: zeros of the output shape) and a naive one (onnxruntime inline in
  the handler, no batching, no checks), each over gRPC and HTTP.
- The compute limit R: onnxruntime in a process of its own, at batch 1 and at its best batch size.
- convserve with its defaults, through KServe v2 ModelInfer over gRPC (raw tensors) and over HTTP
  (binary tensors), and the task API (Classify); and a second convserve with the access log off,
  at the highest concurrency, for the log's cost.

One request costs at least 1/T of a core for the transport and 1/R for the model, so no server can
answer more than L = 1 / (1/T + 1/R) requests per second on one core. Servers and the in-process
runs are pinned to one core and the load generator (this process) to another, so they never share
a core. Points are interleaved (per repeat, per concurrency, per model: every target in turn) so
drift on a noisy machine hits every target alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench import load as bench
from bench import perf_analyzer
from bench.load import BenchError, LoadResult, Progress, ServerProcess, Workload
from bench.perf_analyzer import PerfPoint
from service._proto.inference import grpc_predict_v2_pb2 as kserve_pb2
from service._proto.inference import grpc_predict_v2_pb2_grpc as kserve_grpc
from service.client import DEFAULT_TIMEOUT_SECONDS, VisionClient
from service.engine.sessions import ModelSession, SessionOptions
from service.settings import Settings

SUITE_MODELS = ("lenet5", "scenes-resnet")
SUITE_CONCURRENCY = (1, 8, 64)
SUITE_BATCH_SIZES = (1, 8, 32, 64, 128)
#: Every measured target: (the server process that answers, the API it is called with).
TARGETS = {
    "noop": ("noop", "kserve"),
    "naive": ("naive", "kserve"),
    "kserve": ("convserve", "kserve"),
    "task": ("convserve", "task"),
    "noop-http": ("noop-http", "http"),
    "naive-http": ("naive-http", "http"),
    "http": ("convserve", "http"),
}
#: convserve with the access log off, at the highest concurrency only: what the log costs.
QUIET = "kserve-quiet"
QUIET_TARGET = ("convserve-quiet", "kserve")
CONVSERVE_APIS = ("kserve", "task", "http")
#: Per convserve API: the no-op server of its transport (its transport cost) and the naive server
#: it is held against (Classify against naive KServe gRPC, raw tensors: a cheaper request).
REFERENCES = {"kserve": ("noop", "naive"), "task": ("noop", "naive"), "http": ("noop-http", "naive-http")}
#: Goals. Throughput at the highest concurrency as a fraction of the naive server; extra p50 over
#: the naive server at the lowest; convserve's own CPU per request on lenet5; the access log's
#: cost; cores used while pinned to one; the stretch, a fraction of L; cold start; memory.
GOAL_OF_NAIVE = {"kserve": 1.0, "task": 0.9, "http": 1.0}
GOAL_EXTRA_P50_MS = 0.1
GOAL_OWN_US = 100.0
GOAL_OWN_MODEL = "lenet5"
GOAL_ACCESS_LOG_COST = 0.02
GOAL_CORES = 1.1
STRETCH_FRACTION_OF_LIMIT = 0.90
#: perf_analyzer's shortest measurement window: shorter ones may hold too few requests to report.
PERF_ANALYZER_MIN_SECONDS = 1.0
GOAL_COLD_START_SECONDS = 3.0
GOAL_RSS_MB = 500.0
#: Settings of the caller that the suite's servers keep (all other CONVSERVE_* are dropped).
PASSED_SETTINGS = ("CONVSERVE_PROVIDERS", "CONVSERVE_REQUIRE_GPU")
TARGET_NAMES = {
    "noop": "no-op server, gRPC (reference)",
    "naive": "naive onnxruntime server, gRPC (reference)",
    "kserve": "convserve, KServe v2 gRPC",
    "task": "convserve, Classify (gRPC)",
    "noop-http": "no-op server, HTTP (reference)",
    "naive-http": "naive onnxruntime server, HTTP (reference)",
    "http": "convserve, KServe v2 HTTP",
    QUIET: "convserve, KServe v2 gRPC, access log off",
}


@dataclass(frozen=True)
class SuiteOptions:
    repository: Path = Path("models")
    models: tuple[str, ...] = SUITE_MODELS
    concurrencies: tuple[int, ...] = SUITE_CONCURRENCY
    repeats: int = 3
    duration: float = 3.0
    warmup: float = 1.0
    channels: int = bench.DEFAULT_CHANNELS
    timeout: float = DEFAULT_TIMEOUT_SECONDS
    batch_sizes: tuple[int, ...] = SUITE_BATCH_SIZES
    compute_seconds: float = 1.0  # per batch size, per repeat


@dataclass(frozen=True)
class Cores:
    """Where the servers (and the in-process runs) and the load generator run; None: not pinned."""

    server: frozenset[int] | None
    client: frozenset[int] | None

    def describe(self) -> str:
        if self.server is None or self.client is None:
            return "not pinned (fewer than 2 usable cores)"
        return f"server on core(s) {sorted(self.server)}, load generator on core(s) {sorted(self.client)}"


def choose_cores() -> Cores:
    """The first usable core for the servers, the second for the load generator."""
    usable = sorted(os.sched_getaffinity(0))
    if len(usable) < 2:
        return Cores(None, None)
    return Cores(frozenset(usable[:1]), frozenset(usable[1:2]))


@dataclass(frozen=True)
class RunTotals:
    """A model version's onnxruntime runs as its ModelStatistics count them (cumulative, or a difference)."""

    images: int  # inference_count: rows run
    runs: int  # execution_count
    compute_ns: int  # compute_infer: wall time of onnxruntime's runs, as the server times them

    def __sub__(self, earlier: RunTotals) -> RunTotals:
        return RunTotals(
            self.images - earlier.images, self.runs - earlier.runs, self.compute_ns - earlier.compute_ns
        )

    @property
    def us_per_image(self) -> float:
        return self.compute_ns / 1000 / self.images if self.images > 0 else math.nan

    @property
    def mean_batch(self) -> float:
        return self.images / self.runs if self.runs > 0 else math.nan


@dataclass(frozen=True)
class SuitePoint:
    repeat: int
    target: str  # noop | kserve | task
    model: str
    result: LoadResult
    # convserve: its onnxruntime runs during the point, warm-up and drain included (read before and
    # after it); per image, they compare with the window's CPU per request.
    runs: RunTotals | None = None


@dataclass(frozen=True)
class ComputePoint:
    repeat: int
    model: str
    images_per_second: dict[int, float]  # batch size -> images/s


@dataclass
class ServerFacts:
    """What the convserve server cost to start and to keep."""

    cold_start_seconds: float
    rss_ready_mb: float
    rss_end_mb: float = math.nan
    rss_peak_mb: float = math.nan
    models: list[str] = field(default_factory=list)
    providers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SuiteReport:
    options: SuiteOptions
    cores: Cores
    environment: dict[str, Any]
    server: ServerFacts
    workloads: dict[str, str]
    points: list[SuitePoint]
    compute: list[ComputePoint]
    started: str  # ISO date and time
    perf_analyzer: list[PerfPoint] = field(default_factory=list)
    perf_analyzer_note: str = ""  # why perf_analyzer gave no (or fewer) points

    def summary(self) -> dict[str, Any]:
        return summarize(self)

    def to_dict(self) -> dict[str, Any]:
        options = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self.options).items()}
        return {
            "started": self.started,
            "options": options,
            "cores": self.cores.describe(),
            "environment": self.environment,
            "server": asdict(self.server),
            "workloads": self.workloads,
            "points": [
                {
                    "repeat": p.repeat,
                    "target": p.target,
                    "model": p.model,
                    **p.result.to_dict(),
                    "onnxruntime": asdict(p.runs) if p.runs else None,
                }
                for p in self.points
            ],
            "compute": [asdict(c) for c in self.compute],
            "perf_analyzer": [asdict(p) for p in self.perf_analyzer],
            "perf_analyzer_note": self.perf_analyzer_note,
            "summary": self.summary(),
        }


# --- the compute limit, in a process of its own ---------------------------------------------------


def measure_compute(model_path: Path, batch_sizes: Sequence[int], seconds: float) -> dict[int, float]:
    """Images/s of back-to-back onnxruntime runs per batch size, one intra-op thread.

    The providers are the server's (CONVSERVE_PROVIDERS), so on a GPU machine both use CUDA.
    """
    providers = tuple(Settings().providers)
    session = ModelSession(model_path, SessionOptions(providers=providers, intra_op_threads=1))
    spec = session.inputs[0]
    rng = np.random.default_rng(0)
    rates = {}
    for size in batch_sizes:
        shape = (size, *spec.shape[1:])
        feeds = {spec.name: rng.integers(0, 256, size=shape).astype(spec.dtype)}
        session.run(feeds)  # a new shape: onnxruntime allocates on its first run
        runs, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds:
            session.run(feeds)
            runs += 1
        rates[size] = runs * size / elapsed
    return rates


def compute_in_child(
    model_path: Path, batch_sizes: Sequence[int], seconds: float, cores: frozenset[int] | None
) -> dict[int, float]:
    """measure_compute in a child process pinned like the servers, so it gets their core alone."""
    command = [
        sys.executable, "-m", "bench.suite", "compute", str(model_path),
        ",".join(str(b) for b in batch_sizes), str(seconds),
    ]  # fmt: skip
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        preexec_fn=_pin(cores),
        timeout=60 + 2 * seconds * len(batch_sizes),
    )
    if done.returncode != 0:
        raise BenchError(f"the in-process onnxruntime run failed:\n{done.stderr[-2000:]}")
    return {int(k): v for k, v in json.loads(done.stdout).items()}


def _pin(cores: frozenset[int] | None) -> Any:
    if cores is None:
        return None
    return lambda: os.sched_setaffinity(0, cores)


# --- servers ---------------------------------------------------------------------------------------


def start_pinned(
    command: list[str], log_path: Path, env: dict[str, str], cores: frozenset[int] | None
) -> ServerProcess:
    """A server child on free loopback ports (filled into `command` as {port}, {http_port})."""
    port, http_port = bench.free_ports(2)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CONVSERVE_")}
    argv = [part.format(port=port, http_port=http_port) for part in command]
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            argv,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**clean, **env},
            preexec_fn=_pin(cores),
        )
    return ServerProcess(process, f"127.0.0.1:{port}", log_path, f"127.0.0.1:{http_port}")


def convserve_command(repository: Path) -> list[str]:
    return [
        sys.executable, "-m", "service", "serve", "--model-repository", str(repository),
        "--host", "127.0.0.1", "--grpc-port", "{port}", "--http-port", "{http_port}", "--metrics-port", "-1",
    ]  # fmt: skip


def reference_command(transport: str, mode: str, repository: Path, models: Sequence[str]) -> list[str]:
    command = [
        sys.executable, "-m", f"bench.reference.{transport}_server", "--mode", mode,
        "--model-repository", str(repository),
    ]  # fmt: skip
    for model in models:
        command += ["--model", model]
    return [*command, "--port", "{port}"]


def wait_for_reference(server: ServerProcess, transport: str, timeout: float = 60) -> None:
    """Until the reference server answers its readiness call (it has no health service)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            code = server.process.returncode
            raise BenchError(f"reference server exited with {code}:\n{server.log_tail()}")
        try:
            if transport == "http":
                with urllib.request.urlopen(f"http://{server.target}/v2/health/ready", timeout=2):
                    return
            else:
                with grpc.insecure_channel(server.target) as channel:
                    stub = kserve_grpc.GRPCInferenceServiceStub(channel)
                    stub.ServerReady(kserve_pb2.ServerReadyRequest(), timeout=2, wait_for_ready=True)
                    return
        except (OSError, grpc.RpcError):
            time.sleep(0.1)
    raise BenchError(f"reference server not answering after {timeout:.0f} s:\n{server.log_tail()}")


def rss_mb(pid: int, field_name: str = "VmRSS") -> float:
    """Resident (VmRSS) or peak resident (VmHWM) memory of a process, from /proc."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return math.nan


@contextlib.contextmanager
def suite_servers(
    options: SuiteOptions, cores: Cores, say: Progress
) -> Iterator[tuple[dict[str, ServerProcess], ServerFacts]]:
    """convserve (timed from start to SERVING), convserve with the access log off, and the four
    reference servers, all pinned to the server core; every one stopped on the way out."""
    started: dict[str, ServerProcess] = {}
    passed = {k: os.environ[k] for k in PASSED_SETTINGS if k in os.environ}
    convserve_env = {**passed, "CONVSERVE_REPOSITORY_POLL_SECONDS": "0"}
    with tempfile.TemporaryDirectory(prefix="convserve-suite-") as logs:
        try:
            say(f"starting convserve on {options.repository} ({cores.describe()})")
            begin = time.perf_counter()
            command = convserve_command(options.repository)
            server = start_pinned(command, Path(logs) / "convserve.log", convserve_env, cores.server)
            started["convserve"] = server
            bench.wait_until_serving(server, poll_seconds=0.02)
            facts = ServerFacts(
                cold_start_seconds=time.perf_counter() - begin, rss_ready_mb=rss_mb(server.process.pid)
            )
            quiet = start_pinned(
                convserve_command(options.repository),
                Path(logs) / "convserve-quiet.log",
                {**convserve_env, "CONVSERVE_LOG_LEVEL": "WARNING"},
                cores.server,
            )
            started["convserve-quiet"] = quiet
            for transport in ("grpc", "http"):
                for mode in ("noop", "naive"):
                    name = mode if transport == "grpc" else f"{mode}-http"
                    command = reference_command(transport, mode, options.repository, options.models)
                    started[name] = start_pinned(command, Path(logs) / f"{name}.log", {}, cores.server)
            bench.wait_until_serving(quiet)
            for name, process in started.items():
                if not name.startswith("convserve"):
                    wait_for_reference(process, "http" if name.endswith("-http") else "grpc")
            yield started, facts
            facts.rss_end_mb = rss_mb(server.process.pid)
            facts.rss_peak_mb = rss_mb(server.process.pid, "VmHWM")
        finally:
            for process in started.values():
                process.stop()


# --- the run ---------------------------------------------------------------------------------------


def run_suite(options: SuiteOptions, progress: Progress | None = None) -> SuiteReport:
    say = progress or (lambda line: None)
    for model in options.models:
        if not (options.repository / model).is_dir():
            raise BenchError(f"no model {model!r} in {options.repository} (run `make models` first)")
    cores = choose_cores()
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    previous = os.sched_getaffinity(0)
    if cores.client is not None:
        os.sched_setaffinity(0, cores.client)  # before any gRPC thread of this process exists
    try:
        with suite_servers(options, cores, say) as (servers, facts):
            say(f"convserve SERVING after {facts.cold_start_seconds:.2f} s, RSS {facts.rss_ready_mb:.0f} MB")
            facts.models, facts.providers = served_models(servers["convserve"].target)
            points, compute, workloads = asyncio.run(_measure(options, cores, servers, say))
            say("perf_analyzer against convserve, KServe v2 gRPC")
            perf, perf_note = perf_analyzer.measure_all(
                servers["convserve"].target,
                options.models,
                options.concurrencies,
                max(options.duration, PERF_ANALYZER_MIN_SECONDS),
                _pin(cores.client),
            )
    finally:
        os.sched_setaffinity(0, previous)
    return SuiteReport(
        options=options,
        cores=cores,
        environment=bench.environment(),
        server=facts,
        workloads=workloads,
        points=points,
        compute=compute,
        started=started,
        perf_analyzer=perf,
        perf_analyzer_note=perf_note,
    )


async def run_totals(target: str, model: str, version: str) -> RunTotals:
    """The version's onnxruntime runs so far, from its KServe ModelStatistics."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = kserve_grpc.GRPCInferenceServiceStub(channel)
        answer = await stub.ModelStatistics(
            kserve_pb2.ModelStatisticsRequest(name=model, version=version), timeout=10
        )
    (stats,) = answer.model_stats
    # per batch size, compute_infer counts runs; inference_stats.compute_infer counts each request
    run_ns = sum(batch.compute_infer.ns for batch in stats.batch_stats)
    return RunTotals(stats.inference_count, stats.execution_count, run_ns)


def served_models(target: str) -> tuple[list[str], dict[str, str]]:
    """The models the server has READY and the execution provider each really got."""
    with VisionClient(target, timeout=10) as client:
        models = client.list_models().models
    providers = {m.name: m.versions[0].provider for m in models if m.versions}
    return sorted(m.name for m in models), providers


async def _measure(
    options: SuiteOptions, cores: Cores, servers: dict[str, ServerProcess], say: Progress
) -> tuple[list[SuitePoint], list[ComputePoint], dict[str, str]]:
    convserve = servers["convserve"]
    workloads: dict[str, Workload] = {}
    for model in options.models:
        workloads[model] = await bench.workload_at(convserve.target, model, options.timeout)
    points: list[SuitePoint] = []
    compute: list[ComputePoint] = []
    highest = max(options.concurrencies)
    for repeat in range(options.repeats):
        for model, workload in workloads.items():
            path = options.repository / model / workload.version / "model.onnx"
            rates = await asyncio.to_thread(
                compute_in_child, path, options.batch_sizes, options.compute_seconds, cores.server
            )
            compute.append(ComputePoint(repeat, model, rates))
            best = max(rates, key=rates.__getitem__)
            say(
                f"repeat {repeat + 1}/{options.repeats}  {model} in-process: "
                f"{rates[min(rates)]:.0f} images/s at batch {min(rates)}, {rates[best]:.0f} at batch {best}"
            )
        for concurrency in options.concurrencies:
            for model, workload in workloads.items():
                targets = dict(TARGETS)
                if concurrency == highest:
                    targets[QUIET] = QUIET_TARGET
                for target, (name, api) in targets.items():
                    process = servers[name]
                    ours = name.startswith("convserve")
                    address = process.http_target if ours and api == "http" else process.target
                    before = await run_totals(process.target, model, workload.version) if ours else None
                    result = await bench.bench_server(
                        address,
                        workload,
                        api,
                        concurrency,
                        duration=options.duration,
                        warmup=options.warmup,
                        channels=options.channels,
                        timeout=options.timeout,
                        server_pid=process.process.pid,
                    )
                    runs = None
                    if before is not None:
                        runs = await run_totals(process.target, model, workload.version) - before
                    points.append(SuitePoint(repeat, target, model, result, runs))
                    say(
                        f"repeat {repeat + 1}/{options.repeats}  {model:<13} "
                        + bench.point_line(target, result)
                    )
    return points, compute, {m: bench.describe_workload(w) for m, w in workloads.items()}


# --- the summary -------------------------------------------------------------------------------------


def limit(transport: float, compute: float) -> float:
    """L = 1 / (1/T + 1/R): the most requests/s one core can answer paying both costs."""
    if transport <= 0 or compute <= 0:
        return math.nan
    return 1 / (1 / transport + 1 / compute)


def _median(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return statistics.median(finite) if finite else math.nan


def _noop_of(target: str) -> str:
    """The no-op server of a target's transport: its T."""
    return "noop-http" if target.endswith("http") else "noop"


def summarize(report: SuiteReport) -> dict[str, Any]:
    """Per model: the limits, every point's medians and spread, its ratios to L and to the naive
    server, where convserve's CPU goes, and the goals."""
    options = report.options
    models: dict[str, Any] = {}
    for model in options.models:
        computed = [c.images_per_second for c in report.compute if c.model == model]
        sizes = sorted(computed[0]) if computed else []
        by_size = {size: _median([c[size] for c in computed]) for size in sizes}
        best_size = max(by_size, key=by_size.__getitem__) if by_size else 0
        compute_limit = by_size.get(best_size, math.nan)
        rows = []
        for concurrency in options.concurrencies:
            at = [p for p in report.points if p.model == model and p.result.concurrency == concurrency]
            by_target = {t: [p for p in at if p.target == t] for t in dict.fromkeys(p.target for p in at)}
            throughput = {
                t: _median([p.result.requests_per_second for p in ps]) for t, ps in by_target.items()
            }
            for target, target_points in by_target.items():
                rows.append(
                    _summary_row(model, target, concurrency, target_points, throughput, compute_limit)
                )
        models[model] = {
            "compute_images_per_second": by_size,
            "best_batch_size": best_size,
            "compute_limit": compute_limit,
            "batch1_latency_ms": 1000 / by_size[1] if by_size.get(1) else math.nan,
            "rows": rows,
            "server_cpu": {
                concurrency: _server_cpu(rows, concurrency) for concurrency in options.concurrencies
            },
        }
        models[model]["goals"] = _goals(model, models[model], options.concurrencies)
    server = report.server
    return {
        "models": models,
        "server_goals": {
            "cold_start_seconds": server.cold_start_seconds,
            "cold_start_met": server.cold_start_seconds <= GOAL_COLD_START_SECONDS,
            "rss_peak_mb": server.rss_peak_mb,
            "rss_met": bool(server.rss_peak_mb <= GOAL_RSS_MB),
        },
    }


def _summary_row(
    model: str,
    target: str,
    concurrency: int,
    points: Sequence[SuitePoint],
    throughput: dict[str, float],
    compute_limit: float,
) -> dict[str, Any]:
    results = [p.result for p in points]
    runs = [p.runs for p in points if p.runs is not None]
    rates = [r.requests_per_second for r in results]
    bound = limit(throughput.get(_noop_of(target), math.nan), compute_limit)
    naive = throughput.get(REFERENCES[target][1]) if target in REFERENCES else None
    return {
        "model": model,
        "target": target,
        "concurrency": concurrency,
        "requests_per_second": bench.spread(rates),
        "p50_ms": bench.spread([r.p50_ms for r in results]),
        "p99_ms": bench.spread([r.p99_ms for r in results]),
        "client_cpu_percent": _median([r.cpu_percent for r in results]),
        "errors": sum(sum(r.errors.values()) for r in results),
        "limit": bound,
        "fraction_of_limit": bench.spread([t / bound for t in rates]) if not math.isnan(bound) else None,
        "fraction_of_naive": bench.spread([t / naive for t in rates]) if naive else None,
        "server_cores": _median([r.server_cpu_percent / 100 for r in results]),
        "server_cpu_us_per_request": _median([r.server_cpu_us_per_request for r in results]),
        "onnxruntime_us_per_image": _median([r.us_per_image for r in runs]) if runs else None,
        "mean_batch": _median([r.mean_batch for r in runs]) if runs else None,
    }


def _row(rows: Sequence[dict[str, Any]], target: str, concurrency: int) -> dict[str, Any] | None:
    return next((r for r in rows if r["target"] == target and r["concurrency"] == concurrency), None)


def _server_cpu(rows: Sequence[dict[str, Any]], concurrency: int) -> dict[str, dict[str, float]]:
    """Where one request's server CPU goes, per convserve API: the no-op server's cost for the same
    request over the same transport (transport), onnxruntime's runs as the server timed them (wall
    time per image; the suite sends one image per request), and the rest: convserve's own code
    (checks, batching, statistics, metrics, the access log). The naive server's cost beside it."""
    costs = {}
    for api in CONVSERVE_APIS:
        row = _row(rows, api, concurrency)
        noop, naive = (_row(rows, name, concurrency) for name in REFERENCES[api])
        if row is None or noop is None or naive is None:
            continue
        total = row["server_cpu_us_per_request"]
        transport = noop["server_cpu_us_per_request"]
        onnxruntime = row["onnxruntime_us_per_image"]
        onnxruntime = math.nan if onnxruntime is None else onnxruntime
        costs[api] = {
            "server_us": total,
            "transport_us": transport,
            "onnxruntime_us": onnxruntime,
            "convserve_us": total - transport - onnxruntime,
            "naive_us": naive["server_cpu_us_per_request"],
            "naive_beyond_transport_us": naive["server_cpu_us_per_request"] - transport,
            "mean_batch": math.nan if row["mean_batch"] is None else row["mean_batch"],
        }
    return costs


def _goals(model: str, facts: dict[str, Any], concurrencies: Sequence[int]) -> list[dict[str, Any]]:
    """The targets, each with what was measured and whether it was met."""
    rows, high, low = facts["rows"], max(concurrencies), min(concurrencies)
    goals: list[dict[str, Any]] = []

    def goal(
        name: str, api: str, measured: float | None, at_least: float | None, at_most: float | None
    ) -> None:
        known = measured is not None and not math.isnan(measured)
        met = (
            known and (at_least is None or measured >= at_least) and (at_most is None or measured <= at_most)
        )
        wanted = f">= {at_least:.2f}" if at_least is not None else f"<= {at_most:.2f}"
        goals.append({"goal": name, "api": api, "measured": measured, "wanted": wanted, "met": bool(met)})

    for api in CONVSERVE_APIS:
        row, ours_low = _row(rows, api, high), _row(rows, api, low)
        naive_low = _row(rows, REFERENCES[api][1], low)
        fraction = _median_of(row, "fraction_of_naive")
        goal(f"throughput at concurrency {high}, x naive", api, fraction, GOAL_OF_NAIVE[api], None)
        naive_p50 = _median_of(naive_low, "p50_ms")
        allowed = naive_p50 + GOAL_EXTRA_P50_MS if naive_p50 is not None else None
        goal(f"p50 at concurrency {low}, ms", api, _median_of(ours_low, "p50_ms"), None, allowed)
        goal(
            f"server cores at concurrency {high}", api, row["server_cores"] if row else None, None, GOAL_CORES
        )
    if model == GOAL_OWN_MODEL:
        own = facts["server_cpu"][high].get("kserve", {}).get("convserve_us")
        goal(f"convserve's own CPU per request at concurrency {high}, µs", "kserve", own, None, GOAL_OWN_US)
    logged, quiet = (
        _median_of(_row(rows, "kserve", high), "requests_per_second"),
        _median_of(_row(rows, QUIET, high), "requests_per_second"),
    )
    if logged is not None and quiet:
        goal(
            f"access log cost at concurrency {high}", "kserve", 1 - logged / quiet, None, GOAL_ACCESS_LOG_COST
        )
    fraction = _median_of(_row(rows, "kserve", high), "fraction_of_limit")
    goal(
        f"stretch: throughput at concurrency {high}, x L", "kserve", fraction, STRETCH_FRACTION_OF_LIMIT, None
    )
    return goals


def _median_of(row: dict[str, Any] | None, key: str) -> float | None:
    """A row's median of a spread figure; None when the row or the figure is missing."""
    if row is None or not row.get(key):
        return None
    return row[key]["median"]


# --- the table -----------------------------------------------------------------------------------------


def render_markdown(report: SuiteReport) -> str:
    summary = report.summary()
    env = report.environment
    options = report.options
    lines = [
        f"### convserve-bench --suite ({report.started})",
        "",
        f"Machine: {env['cpus']} CPUs ({env['platform']}), Python {env['python']}, onnxruntime "
        f"{env['onnxruntime']}, grpcio {env['grpcio']}, aiohttp {env['aiohttp']}; {report.cores.describe()}; "
        "convserve with its defaults; the in-process runs with one intra-op thread.",
        f"Method: {options.repeats} repeat(s) of {options.duration:g} s per point after "
        f"{options.warmup:g} s warm-up, interleaved; figures are medians with (min - max) over repeats. "
        "x naive: requests/s over the naive server's of the same transport (Classify: over naive "
        "KServe gRPC). L = 1 / (1/T + 1/R), T the no-op server's requests/s at the same concurrency "
        "and transport, R onnxruntime's images/s at its best batch size.",
        "",
    ]
    for model, facts in summary["models"].items():
        rates = ", ".join(
            f"batch {size}: {rate:,.0f}" for size, rate in facts["compute_images_per_second"].items()
        )
        lines += [
            f"**{model}** ({report.workloads.get(model, '')}); in-process images/s: {rates}; "
            f"R = {facts['compute_limit']:,.0f}, batch-1 latency {facts['batch1_latency_ms']:.3f} ms.",
            "",
            "| target | concurrency | requests/s | p50 ms | p99 ms | x naive | x L | server cores "
            "| server CPU µs/request | onnxruntime µs/image (batch) | errors |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in facts["rows"]:
            cells = [
                TARGET_NAMES[row["target"]],
                str(row["concurrency"]),
                bench.format_spread(row["requests_per_second"], 0),
                bench.format_spread(row["p50_ms"], 2),
                bench.format_spread(row["p99_ms"], 2),
                bench.format_spread(row["fraction_of_naive"], 2) if row["fraction_of_naive"] else "-",
                bench.format_spread(row["fraction_of_limit"], 2) if row["fraction_of_limit"] else "-",
                _or_dash(row["server_cores"], ".2f"),
                _or_dash(row["server_cpu_us_per_request"], ".0f"),
                _onnxruntime_cell(row),
                str(row["errors"]),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", *_server_cpu_lines(facts["server_cpu"]), ""]
    lines += [*_perf_analyzer_lines(report, summary), ""]
    lines += ["| goal | model | API | measured | goal | met |", "|---|---|---|---:|---:|---|"]
    for model, facts in summary["models"].items():
        for goal in facts["goals"]:
            measured = goal["measured"]
            spec = ".1%" if "cost" in goal["goal"] else ".0f" if "µs" in goal["goal"] else ".2f"
            lines.append(
                f"| {goal['goal']} | {model} | {goal['api']} | {_or_dash(measured, spec)} "
                f"| {goal['wanted']} | {_yes(goal['met'])} |"
            )
    server = summary["server_goals"]
    models = ", ".join(report.server.models)
    lines += [
        f"| cold start to SERVING | {models} | - | {server['cold_start_seconds']:.2f} s "
        f"| <= {GOAL_COLD_START_SECONDS:g} s | {_yes(server['cold_start_met'])} |",
        f"| peak RSS | {models} | - | {server['rss_peak_mb']:.0f} MB | <= {GOAL_RSS_MB:g} MB "
        f"| {_yes(server['rss_met'])} |",
        "",
    ]
    return "\n".join(lines)


def _perf_analyzer_lines(report: SuiteReport, summary: dict[str, Any]) -> list[str]:
    """perf_analyzer's figures beside the suite's own for convserve's KServe v2 gRPC."""
    if not report.perf_analyzer:
        return [f"perf_analyzer: not run ({report.perf_analyzer_note or 'no points'})."]
    lines = [
        "perf_analyzer against convserve, KServe v2 gRPC (after the interleaved points; its windows "
        f"of {report.options.duration:g} s), beside convserve-bench's median:",
        "",
        "| model | concurrency | perf_analyzer infer/s | p50 ms | p99 ms | convserve-bench requests/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for point in report.perf_analyzer:
        ours = _row(summary["models"][point.model]["rows"], "kserve", point.concurrency)
        lines.append(
            f"| {point.model} | {point.concurrency} | {point.infer_per_second:,.0f} | {point.p50_ms:.2f} "
            f"| {point.p99_ms:.2f} | {_or_dash(_median_of(ours, 'requests_per_second'), ',.0f')} |"
        )
    if report.perf_analyzer_note:
        lines += ["", f"perf_analyzer stopped: {report.perf_analyzer_note}"]
    return lines


def _onnxruntime_cell(row: dict[str, Any]) -> str:
    if row["onnxruntime_us_per_image"] is None:
        return "-"
    return f"{_or_dash(row['onnxruntime_us_per_image'], '.0f')} ({_or_dash(row['mean_batch'], '.1f')})"


def _server_cpu_lines(by_concurrency: dict[int, dict[str, dict[str, float]]]) -> list[str]:
    lines = [
        "Where one request's server CPU goes (µs): the no-op server's (transport), onnxruntime's runs "
        "in convserve (wall time per image, mean batch), and the rest, convserve's own; the naive "
        "server beside it, and what it spends beyond its transport:",
        "",
        "| API | concurrency | convserve | transport | onnxruntime (batch) | convserve's own "
        "| naive server | naive beyond transport |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for concurrency, costs in by_concurrency.items():
        for api, cost in costs.items():
            lines.append(
                f"| {api} | {concurrency} | {_or_dash(cost['server_us'], '.0f')} "
                f"| {_or_dash(cost['transport_us'], '.0f')} "
                f"| {_or_dash(cost['onnxruntime_us'], '.0f')} ({_or_dash(cost['mean_batch'], '.1f')}) "
                f"| {_or_dash(cost['convserve_us'], '.0f')} | {_or_dash(cost['naive_us'], '.0f')} "
                f"| {_or_dash(cost['naive_beyond_transport_us'], '.0f')} |"
            )
    return lines


def _or_dash(value: float | None, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _yes(met: bool) -> str:
    return "yes" if met else "**no**"


def main(argv: Sequence[str]) -> int:
    """`python -m bench.suite compute MODEL.onnx 1,8,64 SECONDS`: the child of compute_in_child."""
    if len(argv) != 4 or argv[0] != "compute":
        print("usage: python -m bench.suite compute MODEL.onnx BATCH,BATCH,... SECONDS", file=sys.stderr)
        return 2
    rates = measure_compute(Path(argv[1]), [int(b) for b in argv[2].split(",")], float(argv[3]))
    print(json.dumps(rates))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
