"""Soak test (`make soak`, not in CI): many requests at high concurrency against one fresh server.

Starts `convserve serve` on free loopback ports with the default settings on a model repository,
then sends `--requests` calls (default 100,000) from `--concurrency` closed-loop workers, spread
round-robin over the RPCs the repository allows: Classify and KServe ModelInfer on lenet5 always,
Generate when dcgan is ready, Caption when captioner is ready. Reports the calls by RPC and status
code, throughput, p50/p99 latency per RPC, and the server's resident memory (VmRSS) after a
warm-up, at its peak and at the end.

    .venv/bin/python tools/soak.py --model-repository models --requests 5000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import load as bench
from service._proto.convserve.v1 import vision_pb2, vision_pb2_grpc
from service._proto.inference import grpc_predict_v2_pb2_grpc as kserve_grpc
from service.client import VisionClient

Call = Callable[[int], Awaitable[object]]


def rss_mb(pid: int) -> float:
    """The process's resident set size (VmRSS) in MiB; NaN where /proc is not there."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def ready_models(target: str) -> set[str]:
    with VisionClient(target, timeout=10) as client:
        return {
            model.name
            for model in client.list_models().models
            if any(v.state == vision_pb2.MODEL_STATE_READY for v in model.versions)
        }


async def build_calls(target: str, channels: list[grpc.aio.Channel], timeout: float) -> dict[str, Call]:
    """One call per RPC the served models allow; each call picks its channel and request by sequence."""
    models = ready_models(target)
    if "lenet5" not in models:
        raise SystemExit(f"lenet5 is not ready on the server (ready: {sorted(models)})")
    workload = await bench.fetch_workload(channels[0], "lenet5", timeout)
    classify = bench.task_requests(workload, 1)[: bench.MAX_DISTINCT_REQUESTS]
    infer = bench.kserve_requests(workload, 1)[: bench.MAX_DISTINCT_REQUESTS]
    vision = [vision_pb2_grpc.VisionStub(c) for c in channels]
    kserve = [kserve_grpc.GRPCInferenceServiceStub(c) for c in channels]

    def pick(stubs: list, sequence: int):
        return stubs[sequence % len(stubs)]

    calls: dict[str, Call] = {
        "Classify": lambda i: pick(vision, i).Classify(classify[i % len(classify)], timeout=timeout),
        "ModelInfer": lambda i: pick(kserve, i).ModelInfer(infer[i % len(infer)], timeout=timeout),
    }
    if "dcgan" in models:
        calls["Generate"] = lambda i: pick(vision, i).Generate(
            vision_pb2.GenerateRequest(model="dcgan", count=1, labels=[i % 10], seed=i), timeout=timeout
        )
    if "captioner" in models:
        scenes = bench.caption_requests(await bench.caption_workload(target, "captioner", timeout), 1)
        calls["Caption"] = lambda i: pick(vision, i).Caption(scenes[i % len(scenes)], timeout=timeout)
    return calls


async def soak(target: str, pid: int, args: argparse.Namespace) -> dict:
    channels = bench.open_channels(target, args.channels)
    try:
        calls = await build_calls(target, channels, args.timeout)
        names = list(calls)
        codes: dict[str, Counter[str]] = defaultdict(Counter)
        latencies: dict[str, list[float]] = defaultdict(list)
        issued = 0
        peak = 0.0

        async def worker(total: int, record: bool) -> None:
            nonlocal issued
            while issued < total:
                sequence = issued
                issued += 1
                name = names[sequence % len(names)]
                sent = time.perf_counter()
                try:
                    await calls[name](sequence)
                    code = "OK"
                except grpc.aio.AioRpcError as exc:
                    code = exc.code().name
                if record:
                    codes[name][code] += 1
                    if code == "OK":
                        latencies[name].append(time.perf_counter() - sent)

        async def sample_rss(stop: asyncio.Event) -> None:
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, rss_mb(pid))
                await asyncio.sleep(0.5)

        warmup = min(2000, args.requests)
        await asyncio.gather(*(worker(warmup, False) for _ in range(args.concurrency)))
        before = rss_mb(pid)
        issued = 0
        stop = asyncio.Event()
        sampler = asyncio.create_task(sample_rss(stop))
        started = time.perf_counter()
        last_report = started
        progress = asyncio.gather(*(worker(args.requests, True) for _ in range(args.concurrency)))
        while not progress.done():
            await asyncio.wait([progress], timeout=1.0)
            now = time.perf_counter()
            if now - last_report >= 10:
                last_report = now
                done = sum(sum(c.values()) for c in codes.values())
                print(f"  {done} / {args.requests} after {now - started:.0f} s", file=sys.stderr)
        progress.result()
        seconds = time.perf_counter() - started
        stop.set()
        await sampler
        after = rss_mb(pid)
    finally:
        for channel in channels:
            await channel.close()

    def ms(values: list[float], q: float) -> float | None:
        return round(bench.percentile(values, q) * 1000, 2) if values else None

    every = [s for values in latencies.values() for s in values]
    total = sum(sum(c.values()) for c in codes.values())
    return {
        "requests": total,
        "concurrency": args.concurrency,
        "seconds": round(seconds, 2),
        "throughput_rps": round(total / seconds, 1),
        "codes": dict(sum(codes.values(), Counter())),
        "p50_ms": ms(every, 50),
        "p99_ms": ms(every, 99),
        "by_rpc": {
            name: {
                "codes": dict(codes[name]),
                "p50_ms": ms(latencies[name], 50),
                "p99_ms": ms(latencies[name], 99),
            }
            for name in names
        },
        "server_rss_mb": {"after_warmup": round(before, 1), "peak": round(peak, 1), "end": round(after, 1)},
    }


def render(report: dict) -> str:
    lines = [
        f"{report['requests']} requests, concurrency {report['concurrency']}, {report['seconds']} s: "
        f"{report['throughput_rps']} req/s, p50 {report['p50_ms']} ms, p99 {report['p99_ms']} ms",
        f"status codes: {report['codes']}",
    ]
    for name, row in report["by_rpc"].items():
        lines.append(f"  {name:<10} {row['codes']}  p50 {row['p50_ms']} ms  p99 {row['p99_ms']} ms")
    rss = report["server_rss_mb"]
    lines.append(f"server RSS: {rss['after_warmup']} MiB after warm-up, peak {rss['peak']}, end {rss['end']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-repository", type=Path, default=Path("models"))
    parser.add_argument("--requests", type=int, default=100_000, help="calls to count (default: 100000)")
    parser.add_argument("--concurrency", type=int, default=128, help="closed-loop workers (default: 128)")
    parser.add_argument("--channels", type=int, default=4, help="gRPC connections (default: 4)")
    parser.add_argument("--timeout", type=float, default=30.0, help="deadline of each call in seconds")
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    if not (args.model_repository / "lenet5").is_dir():
        parser.error(f"no lenet5 in {args.model_repository} (train it: convserve-train all --only lenet5)")
    with tempfile.TemporaryDirectory(prefix="convserve-soak-") as logs:
        server = bench.start_server(args.model_repository, Path(logs) / "server.log", {})
        try:
            bench.wait_until_serving(server)
            print(f"server pid {server.process.pid} on {server.target}; soaking", file=sys.stderr)
            report = asyncio.run(soak(server.target, server.process.pid, args))
        finally:
            server.stop()
        report["server_exit_code"] = server.process.returncode
    print(render(report))
    print(f"server exit code: {report['server_exit_code']}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    unexpected = set(report["codes"]) - {"OK"}
    return 1 if unexpected or report["server_exit_code"] != 0 else 0


if __name__ == "__main__":
    sys.exit(main())
