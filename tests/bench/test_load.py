"""`convserve-bench`: structure and sanity only; a shared noisy machine makes timings meaningless here."""

from __future__ import annotations

import asyncio
import json
import math

import grpc
import numpy as np
import pytest

from bench import load as bench
from bench.cli import main


def _workload(target: str) -> bench.Workload:
    async def fetch() -> bench.Workload:
        async with grpc.aio.insecure_channel(target) as channel:
            return await bench.fetch_workload(channel, "lenet5", timeout=10)

    return asyncio.run(fetch())


def _sane(result: bench.LoadResult, concurrency: int) -> None:
    assert result.concurrency == concurrency
    assert result.requests > 0
    assert result.images == result.requests
    assert result.errors == {}
    assert result.seconds > 0
    assert 0 < result.p50_ms <= result.p90_ms <= result.p99_ms
    assert result.requests_per_second > 0
    assert result.cpu_percent >= 0


def test_percentile_matches_numpy() -> None:
    values = list(np.random.default_rng(0).exponential(size=101))
    for q in (0, 1, 50, 90, 99, 100):
        assert bench.percentile(values, q) == pytest.approx(np.percentile(values, q))
    assert bench.percentile([3.0], 99) == 3.0
    assert bench.percentile([1.0, 2.0], 50) == 1.5
    with pytest.raises(ValueError):
        bench.percentile([], 50)


def test_workload_uses_held_out_digits_and_falls_back_to_random() -> None:
    digits, source = bench.workload_images("lenet5", (1, 32, 32), "UINT8")
    assert digits.shape[1:] == (1, 32, 32) and "digits" in source
    noise, source = bench.workload_images("other", (3, 8, 8), "UINT8")
    assert noise.shape[1:] == (3, 8, 8) and noise.dtype == np.uint8 and "random" in source
    with pytest.raises(bench.BenchError):
        bench.workload_images("other", (1, -1, -1), "UINT8")


@pytest.mark.parametrize("api", [api for api in bench.APIS if api != "caption"])  # caption: test_caption.py
def test_bench_server_for_a_second(server, api: str) -> None:
    workload = _workload(server.target)
    assert (workload.input_name, workload.datatype) == ("image", "UINT8")
    target = server.http_url.removeprefix("http://") if api == "http" else server.target
    result = asyncio.run(bench.bench_server(target, workload, api, 4, duration=1.0, warmup=0.2))
    _sane(result, 4)


def test_http_reads_the_model_over_http_and_sends_binary_tensors(server) -> None:
    workload = asyncio.run(bench.workload_at(server.http_url, "lenet5", 10, api="http"))
    over_grpc = _workload(server.target)
    assert (workload.version, workload.input_name, workload.datatype, workload.source) == (
        over_grpc.version, over_grpc.input_name, over_grpc.datatype, over_grpc.source,
    )  # fmt: skip
    assert np.array_equal(workload.images, over_grpc.images)
    body, headers = bench.http_requests(workload, 3)[0]
    header_length = int(headers["Inference-Header-Content-Length"])
    header = json.loads(body[:header_length])
    (tensor,) = header["inputs"]
    assert tensor["shape"] == [3, 1, 32, 32] and header["parameters"] == {"binary_data_output": True}
    assert len(body) - header_length == tensor["parameters"]["binary_data_size"] == 3 * 32 * 32


def test_bench_counts_exactly_the_requests_asked_for(server) -> None:
    workload = _workload(server.target)
    result = asyncio.run(
        bench.bench_server(server.target, workload, "kserve", 3, requests=25, images_per_request=2, warmup=0)
    )
    assert (result.requests, result.images, result.errors) == (25, 50, {})


def test_errors_are_counted_by_status_code(server) -> None:
    workload = _workload(server.target)
    missing = bench.Workload("nope", "", "image", "UINT8", workload.images, "digits")
    result = asyncio.run(bench.bench_server(server.target, missing, "kserve", 2, requests=10, warmup=0))
    assert (result.requests, result.errors) == (0, {"NOT_FOUND": 10})
    assert math.isnan(result.p50_ms)
    assert result.to_dict()["p50_ms"] is None
    result = asyncio.run(bench.bench_server(server.http_url, missing, "http", 2, requests=10, warmup=0))
    assert (result.requests, result.errors) == (0, {"HTTP 404": 10})


def test_cli_bench_json(server, capsys) -> None:
    code = main(["--target", server.target, "--concurrency", "2", "--duration", "0.3", "--json"])
    record = json.loads(capsys.readouterr().out)
    assert code == 0
    (result,) = record["results"]
    assert (record["model"], record["api"], result["concurrency"]) == ("lenet5", "task", 2)
    assert result["requests"] > 0 and result["errors"] == {}


def test_cli_bench_http_json(server, capsys) -> None:
    target = server.http_url.removeprefix("http://")
    argv = ["--api", "http", "--target", target, "--concurrency", "4", "--duration", "0.5", "--json"]
    code = main(argv)
    record = json.loads(capsys.readouterr().out)
    assert code == 0
    (result,) = record["results"]
    assert (record["target"], record["api"], record["model"]) == (target, "http", "lenet5")
    assert result["requests"] > 0 and result["errors"] == {}
    assert main(["--api", "http", "--target", target, "--model", "nope", "--duration", "0.1"]) == 1
    assert "HTTP 404" in capsys.readouterr().err


def test_cli_compare_tiny(trained_lenet, tmp_path, capsys) -> None:
    json_path, markdown_path = tmp_path / "bench.json", tmp_path / "bench.md"
    code = main(
        [
            "--compare", "--model-repository", str(trained_lenet),
            "--concurrency", "2", "--repeats", "1", "--duration", "0.5", "--warmup", "0.1",
            "--json", str(json_path), "--markdown", str(markdown_path),
        ]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    report = json.loads(json_path.read_text())
    assert [p["mode"] for p in report["points"]] == list(bench.MODES)
    for point in report["points"]:
        assert point["requests"] > 0 and point["errors"] == {}
        assert point["p50_ms"] <= point["p99_ms"]
    assert report["servers"]["off"]["max_batch_size"] == 1
    assert report["servers"]["on"]["max_batch_size"] == 64
    summary = report["summary"]
    assert [row["mode"] for row in summary["points"]] == list(bench.MODES)
    assert all(row["images_per_second"]["median"] > 0 for row in summary["points"])
    (batching,) = summary["batching"]
    assert batching["throughput_ratio"]["median"] > 0
    limit = summary["compute_limit"]
    assert limit["best_batch_size"] in bench.BATCH_SIZES
    assert {int(size) for size in limit["by_batch_size"]} == set(bench.BATCH_SIZES)
    table = markdown_path.read_text()
    assert table == out
    for name in bench.MODE_NAMES.values():
        assert f"| 2 | {name} |" in table
    assert "compute limit" in table


def test_cli_transports_tiny(trained_lenet, tmp_path, capsys) -> None:
    json_path = tmp_path / "transports.json"
    code = main(
        [
            "--transports", "--model-repository", str(trained_lenet),
            "--concurrency", "2", "--repeats", "1", "--duration", "0.5", "--warmup", "0.1",
            "--json", str(json_path),
        ]
    )  # fmt: skip
    table = capsys.readouterr().out
    assert code == 0
    report = json.loads(json_path.read_text())
    assert [p["mode"] for p in report["points"]] == list(bench.TRANSPORTS)
    for point in report["points"]:
        assert point["requests"] > 0 and point["errors"] == {}
        assert point["p50_ms"] <= point["p99_ms"]
    summary = report["summary"]
    assert all(row["requests_per_second"]["median"] > 0 for row in summary["points"])
    (pair,) = summary["http_vs_grpc"]
    assert pair["throughput_ratio"]["median"] > 0
    for name in bench.TRANSPORT_NAMES.values():
        assert f"| 2 | {name} |" in table
    assert "| concurrency | throughput HTTP/gRPC |" in table


def test_cli_bench_refuses_impossible_flags(capsys) -> None:
    assert main(["--duration", "0"]) == 1
    assert "--duration must be > 0" in capsys.readouterr().err
    assert main(["--compare", "--requests", "5"]) == 1
    assert "not --requests" in capsys.readouterr().err
    assert main(["--transports", "--requests", "5"]) == 1
    assert "not --requests" in capsys.readouterr().err
    assert main(["--compare", "--transports"]) == 1
    assert "choose one" in capsys.readouterr().err
