"""Overload and forgotten deadlines: a request without a deadline gets the server's default, and a
big flood against a small queue is refused at once, keeps memory bounded and leaves the server well.

(tests/service/test_load_and_swap.py has the small flood: exact counts and refusal latency.)
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections import Counter
from pathlib import Path

import grpc
from conftest import start_server
from drawing import draw_digit, png_bytes

from service._proto.convserve.v1 import vision_pb2_grpc as pb_grpc
from service.client import AsyncVisionClient, VisionClient, classify_request

DIGIT = png_bytes(draw_digit("4"))


def _metric(server, name: str) -> float:
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " ")]
    return sum(values)


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_request_without_deadline_gets_the_default_and_never_runs(model_repository, tmp_path):
    """No client deadline: the server's default (0.5 s) applies; the 3 s batch window outlasts it."""
    env = {"CONVSERVE_DEFAULT_TIMEOUT_SECONDS": "0.5", "CONVSERVE_MAX_QUEUE_DELAY": "3.0"}
    server = start_server(model_repository, tmp_path / "log", env)
    inferences = 'convserve_inferences_total{model="lenet5",version="1"}'
    expired = 'convserve_request_failures_total{model="lenet5",reason="deadline_exceeded",version="1"}'
    try:
        before = _metric(server, inferences)
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.VisionStub(channel)
            request = classify_request([DIGIT] * 5, model="lenet5")
            call = stub.Classify.future(request)  # no deadline on the wire; the wait below is ours
            try:
                call.result(timeout=60)
                raise AssertionError("a request without a deadline outlived the server's default")
            except grpc.RpcError as exc:
                assert exc.code() is grpc.StatusCode.DEADLINE_EXCEEDED, exc.details()
        # The server counts the failure after the status is on its way: wait for it, generously.
        deadline = time.monotonic() + 15
        while _metric(server, expired) < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _metric(server, expired) == 1
        time.sleep(3.5)  # past the batch window: had the rows stayed queued, they would have run now
        assert _metric(server, inferences) == before  # its rows never reached onnxruntime
        with VisionClient(server.target) as client:  # a client deadline still wins over the default
            assert client.classify([DIGIT], top_k=1, timeout=30).results[0].predictions[0].label == "4"
        assert _metric(server, inferences) == before + 1
    finally:
        assert server.stop() == 0


def test_big_flood_is_refused_at_once_memory_stays_bounded_and_the_server_recovers(
    model_repository, tmp_path
):
    env = {"CONVSERVE_MAX_QUEUE_SIZE": "8", "CONVSERVE_MAX_QUEUE_DELAY": "2.0"}  # batches wait up to 2 s
    server = start_server(model_repository, tmp_path / "log", env)

    async def flood(rounds: int, size: int) -> list[tuple[str, float]]:
        outcomes: list[tuple[str, float]] = []
        async with AsyncVisionClient(server.target, timeout=60) as client:

            async def one() -> tuple[str, float]:
                started = time.perf_counter()
                try:
                    await client.classify([DIGIT], top_k=1)
                    code = "OK"
                except grpc.aio.AioRpcError as exc:
                    code = exc.code().name
                return code, time.perf_counter() - started

            for _ in range(rounds):
                outcomes += await asyncio.gather(*(one() for _ in range(size)))
        return outcomes

    try:
        asyncio.run(flood(1, 50))  # allocator, channels and caches settle
        settled = _rss_mb(server.process.pid)
        outcomes = asyncio.run(flood(4, 500))
        grown = _rss_mb(server.process.pid) - settled
        codes = Counter(code for code, _ in outcomes)
        assert set(codes) == {"OK", "RESOURCE_EXHAUSTED"}, codes
        assert codes["OK"] >= 4 * 8  # each round fills the queue at least once
        refused = sorted(seconds for code, seconds in outcomes if code == "RESOURCE_EXHAUSTED")
        # Refusals never wait for the 2 s batch window (the median leaves room for a loaded client).
        assert refused[len(refused) // 2] < 1.0, refused[len(refused) // 2]
        assert grown < 100, f"RSS grew {grown:.1f} MB over a flood of 2000 requests"
        with VisionClient(server.target) as client:
            assert client.health("") == "SERVING"
            assert client.health("lenet5") == "SERVING"
            for _ in range(3):  # recovered: plain requests succeed again
                response = client.classify([DIGIT], top_k=1, timeout=30)
                assert response.results[0].predictions[0].label == "4"
    finally:
        assert server.stop() == 0
