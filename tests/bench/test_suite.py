"""The performance suite: its no-op server, its limit arithmetic, and a tiny end-to-end run."""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from bench import load as bench
from bench import suite as bench_suite
from bench.cli import main
from service.engine.batching import BatchingOptions, DynamicBatcher
from service.server import ConvserveServer
from service.settings import Settings, runs_inline


def test_limit_is_the_harmonic_combination_of_both_costs() -> None:
    assert bench_suite.limit(1000, 1000) == pytest.approx(500)
    assert bench_suite.limit(2000, 50_000) == pytest.approx(1 / (1 / 2000 + 1 / 50_000))
    assert math.isnan(bench_suite.limit(0, 1000))


def test_cli_suite_tiny(trained_lenet, tmp_path, capsys) -> None:
    json_path, markdown_path = tmp_path / "suite.json", tmp_path / "suite.md"
    code = main(
        [
            "--suite", "--models", "lenet5", "--model-repository", str(trained_lenet),
            "--concurrency", "1,2", "--repeats", "1", "--duration", "0.3", "--warmup", "0.1",
            "--json", str(json_path), "--markdown", str(markdown_path),
        ]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    report = json.loads(json_path.read_text())
    targets = {(p["target"], p["concurrency"]) for p in report["points"]}
    expected_targets = {(t, c) for t in bench_suite.TARGETS for c in (1, 2)} | {(bench_suite.QUIET, 2)}
    assert targets == expected_targets
    assert all(p["requests"] > 0 and p["errors"] == {} for p in report["points"])
    assert report["server"]["cold_start_seconds"] > 0 and report["server"]["rss_peak_mb"] > 0
    assert report["server"]["providers"]["lenet5"] == "CPUExecutionProvider"
    facts = report["summary"]["models"]["lenet5"]
    (compute,) = report["compute"]
    rates = {int(k): v for k, v in compute["images_per_second"].items()}
    assert set(rates) == set(bench_suite.SUITE_BATCH_SIZES)
    assert facts["compute_limit"] == pytest.approx(max(rates.values()))

    def row(target: str, concurrency: int) -> dict:
        return next(r for r in facts["rows"] if r["target"] == target and r["concurrency"] == concurrency)

    for r in facts["rows"]:
        noop = row("noop-http" if r["target"].endswith("http") else "noop", r["concurrency"])
        expected = bench_suite.limit(noop["requests_per_second"]["median"], facts["compute_limit"])
        assert r["limit"] == pytest.approx(expected)
        fraction = r["requests_per_second"]["median"] / expected
        assert r["fraction_of_limit"]["median"] == pytest.approx(fraction)
        if r["target"] in bench_suite.REFERENCES:  # convserve's APIs, against their naive server
            naive = row(bench_suite.REFERENCES[r["target"]][1], r["concurrency"])
            ratio = r["requests_per_second"]["median"] / naive["requests_per_second"]["median"]
            assert r["fraction_of_naive"]["median"] == pytest.approx(ratio)
        else:
            assert r["fraction_of_naive"] is None
        assert 0 <= r["server_cores"] < 2  # from /proc's clock ticks: a short, idle window may read 0
    # The server's CPU per request, and convserve's onnxruntime runs during each of its points.
    assert all(p["server_cpu_us_per_request"] >= 0 for p in report["points"])
    assert all(p["server_cpu_us_per_request"] > 0 for p in report["points"] if p["target"] == "kserve")
    for point in report["points"]:
        runs = point["onnxruntime"]
        if point["target"] in ("noop", "naive", "noop-http", "naive-http"):
            assert runs is None
        else:  # the runs' count spans warm-up and drain too, so at least the window's images
            assert runs["images"] >= point["images"] and runs["runs"] >= 1 and runs["compute_ns"] > 0
    costs = facts["server_cpu"]["2"]
    assert set(costs) == set(bench_suite.CONVSERVE_APIS)
    for api, cost in costs.items():
        ours, (noop_name, naive_name) = row(api, 2), bench_suite.REFERENCES[api]
        assert cost["server_us"] == pytest.approx(ours["server_cpu_us_per_request"])
        assert cost["transport_us"] == pytest.approx(row(noop_name, 2)["server_cpu_us_per_request"])
        assert cost["onnxruntime_us"] == pytest.approx(ours["onnxruntime_us_per_image"])
        own = cost["server_us"] - cost["transport_us"] - cost["onnxruntime_us"]
        assert cost["convserve_us"] == pytest.approx(own)
        assert cost["naive_us"] == pytest.approx(row(naive_name, 2)["server_cpu_us_per_request"])
        assert cost["mean_batch"] >= 1
    goals = {(g["goal"], g["api"]) for g in facts["goals"]}
    assert ("throughput at concurrency 2, x naive", "task") in goals
    assert ("access log cost at concurrency 2", "kserve") in goals
    assert ("convserve's own CPU per request at concurrency 2, µs", "kserve") in goals
    perf = report["perf_analyzer"]  # the dev extra ships it; make system-deps adds its library
    assert [(p["model"], p["concurrency"]) for p in perf] == [("lenet5", 1), ("lenet5", 2)], report[
        "perf_analyzer_note"
    ]
    assert all(p["infer_per_second"] > 0 and 0 < p["p50_ms"] <= p["p99_ms"] for p in perf)
    table = markdown_path.read_text()
    assert table == out
    assert "perf_analyzer against convserve, KServe v2 gRPC" in table
    assert "naive onnxruntime server, HTTP (reference)" in table
    assert "convserve, KServe v2 gRPC, access log off" in table
    assert "Where one request's server CPU goes" in table
    assert "| cold start to SERVING |" in table


def test_process_cpu_seconds_follows_a_process_that_works() -> None:
    before = bench.process_cpu_seconds(os.getpid())
    deadline = time.process_time() + 0.2
    while time.process_time() < deadline:  # burn 0.2 s of CPU
        pass
    after = bench.process_cpu_seconds(os.getpid())
    assert after - before >= 0.1  # /proc counts in clock ticks (10 ms)
    assert math.isnan(bench.process_cpu_seconds(2**22 + 1))  # above any pid_max: no such process


def test_run_totals_difference_per_image_and_batch() -> None:
    later = bench_suite.RunTotals(images=130, runs=20, compute_ns=9_000_000)
    earlier = bench_suite.RunTotals(images=30, runs=10, compute_ns=1_000_000)
    window = later - earlier
    assert window == bench_suite.RunTotals(100, 10, 8_000_000)
    assert window.us_per_image == pytest.approx(80) and window.mean_batch == pytest.approx(10)
    assert math.isnan(bench_suite.RunTotals(0, 0, 0).us_per_image)


def test_execution_auto_is_inline_only_with_one_usable_cpu() -> None:
    assert runs_inline("inline") and not runs_inline("thread")
    assert runs_inline("auto") == (len(os.sched_getaffinity(0)) == 1)
    first = min(os.sched_getaffinity(0))
    pinned = subprocess.run(
        [sys.executable, "-c", "from service.settings import runs_inline; print(runs_inline('auto'))"],
        capture_output=True,
        text=True,
        preexec_fn=lambda: os.sched_setaffinity(0, {first}),
        check=True,
    )
    assert pinned.stdout.strip() == "True"


@pytest.mark.parametrize("execution", ["inline", "thread"])
def test_server_batchers_follow_the_execution_setting(execution: str, tmp_path) -> None:
    server = ConvserveServer(Settings(model_repository=tmp_path, execution=execution))
    assert server.repository.batching.inline is (execution == "inline")


@pytest.mark.parametrize("inline", [True, False])
def test_inline_batcher_runs_on_the_event_loop_thread(inline: bool) -> None:
    ran_on: list[int] = []

    def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        ran_on.append(threading.get_ident())
        return [feeds["x"] * 2]

    async def scenario() -> list[list[np.ndarray]]:
        batcher = DynamicBatcher(run, BatchingOptions(max_batch_size=8, inline=inline))
        try:
            return await asyncio.gather(
                *(batcher.submit({"x": np.full((2, 3), i, dtype=np.float32)}) for i in range(5))
            )
        finally:
            await batcher.close()

    results = asyncio.run(scenario())
    for i, (output,) in enumerate(results):
        assert output.shape == (2, 3) and (output == 2 * i).all()
    assert ran_on and all((ident == threading.get_ident()) == inline for ident in ran_on)
