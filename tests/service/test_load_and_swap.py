"""Under traffic: a new version swaps in with no failed request, a broken one changes nothing,
a flooded queue refuses at once and recovers, and load/unload cycles do not leak memory."""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import grpc
import pytest
from conftest import start_server
from drawing import draw_digit, png_bytes

from service._proto.convserve.v1 import vision_pb2 as vision_pb
from service._proto.inference import grpc_predict_v2_pb2 as pb
from service._proto.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from service.client import AsyncVisionClient, VisionClient

DIGIT = png_bytes(draw_digit("6"))


def _publish(model_dir: Path, version: int, source: Path | None) -> None:
    """As the trainer does: a hidden folder renamed into place."""
    hidden = model_dir / f".incoming-{version}"
    if source is None:
        hidden.mkdir()
        (hidden / "model.onnx").write_bytes(b"this is not an onnx model")
    else:
        shutil.copytree(source, hidden)
    hidden.rename(model_dir / str(version))


def _wait_for(predicate, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_new_version_under_load_loses_nothing_and_a_broken_one_changes_nothing(model_repository, tmp_path):
    server = start_server(model_repository, tmp_path / "log", {"CONVSERVE_REPOSITORY_POLL_SECONDS": "0.2"})
    answered: Counter[str] = Counter()
    failures: list[str] = []
    stop = threading.Event()

    def traffic() -> None:
        with VisionClient(server.target) as client:
            while not stop.is_set():
                try:
                    response = client.classify([DIGIT], top_k=1)
                    assert response.results[0].predictions[0].label == "6"
                    answered[response.version] += 1
                except grpc.RpcError as exc:
                    failures.append(f"{exc.code().name}: {exc.details()}")

    workers = [threading.Thread(target=traffic) for _ in range(4)]
    model_dir = model_repository / "lenet5"
    try:
        for worker in workers:
            worker.start()
        _wait_for(lambda: answered["1"] > 50)
        _publish(model_dir, 2, model_dir / "1")
        _wait_for(lambda: answered["2"] > 50)
        _publish(model_dir, 3, None)
        with VisionClient(server.target) as client:

            def state_of_3() -> vision_pb.ModelVersion | None:
                versions = {v.version: v for v in client.list_models().models[0].versions}
                return versions.get("3")

            _wait_for(lambda: state_of_3() is not None and state_of_3().state == vision_pb.MODEL_STATE_FAILED)
            served_before = answered["2"]
            _wait_for(lambda: answered["2"] > served_before + 50)
            assert "onnxruntime could not load" in state_of_3().reason
            assert client.health("lenet5") == "SERVING"
    finally:
        stop.set()
        for worker in workers:
            worker.join()
        metrics = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
        server.stop()
    assert failures == []
    assert answered["1"] > 0 and answered["2"] > 0 and answered["3"] == 0
    assert 'convserve_model_load_failures_total{model="lenet5"} 1.0' in metrics


def test_flooded_queue_refuses_at_once_and_the_server_recovers(model_repository, tmp_path):
    env = {"CONVSERVE_MAX_QUEUE_SIZE": "4", "CONVSERVE_MAX_QUEUE_DELAY": "1.0"}  # batches wait up to 1 s
    server = start_server(model_repository, tmp_path / "log", env)

    async def flood() -> list[tuple[str, float]]:
        async with AsyncVisionClient(server.target) as client:

            async def one() -> tuple[str, float]:
                started = time.perf_counter()
                try:
                    await client.classify([DIGIT])
                    code = "OK"
                except grpc.aio.AioRpcError as exc:
                    code = exc.code().name
                return code, time.perf_counter() - started

            return await asyncio.gather(*(one() for _ in range(20)))

    try:
        outcomes = asyncio.run(flood())
        codes = Counter(code for code, _ in outcomes)
        assert codes == {"OK": 4, "RESOURCE_EXHAUSTED": 16}
        refused = [seconds for code, seconds in outcomes if code == "RESOURCE_EXHAUSTED"]
        assert max(refused) < 0.5  # never waited for the 1 s batch window
        with VisionClient(server.target) as client:
            assert client.health("") == "SERVING"
            assert client.classify([DIGIT], top_k=1).results[0].predictions[0].label == "6"
    finally:
        server.stop()


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_memory_stays_flat_across_load_unload_cycles(model_repository, tmp_path):
    server = start_server(model_repository, tmp_path / "log", {"CONVSERVE_REPOSITORY_CONTROL": "enabled"})
    try:
        with grpc.insecure_channel(server.target) as channel, VisionClient(server.target) as client:
            kserve = pb_grpc.GRPCInferenceServiceStub(channel)

            def cycles(n: int) -> None:
                for _ in range(n):
                    kserve.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="lenet5"))
                    kserve.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="lenet5"))
                    client.classify([DIGIT])

            cycles(10)  # allocator and caches settle
            settled = _rss_mb(server.process.pid)
            cycles(40)
            grown = _rss_mb(server.process.pid) - settled
    finally:
        server.stop()
    assert grown < 10, f"RSS grew {grown:.1f} MB over 40 load/unload cycles"


def _metric(server, name: str) -> float:
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " ")]
    return sum(values)


def test_expired_requests_never_run(model_repository, tmp_path):
    """A deadline shorter than the batch window: DEADLINE_EXCEEDED, and its rows never reach onnxruntime."""
    # A wide margin on both sides: the request must reach the queue before its deadline even on a
    # busy machine, and the deadline must pass long before the batch window closes.
    server = start_server(model_repository, tmp_path / "log", {"CONVSERVE_MAX_QUEUE_DELAY": "2.0"})
    inferences = 'convserve_inferences_total{model="lenet5",version="1"}'
    try:
        with VisionClient(server.target) as client:
            before = _metric(server, inferences)
            with pytest.raises(grpc.RpcError) as info:
                client.classify([DIGIT] * 5, timeout=0.5)
            assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            time.sleep(2.0)
            reason = 'convserve_request_failures_total{model="lenet5",reason="deadline_exceeded",version="1"}'
            assert (
                _metric(server, reason) == 1
            )  # past the batch window: had the rows stayed queued, they would have run now
            assert _metric(server, inferences) == before
            assert client.classify([DIGIT], top_k=1).results[0].predictions[0].label == "6"
            assert _metric(server, inferences) == before + 1
    finally:
        server.stop()


def test_stream_messages_are_counted_like_calls(server):
    with grpc.insecure_channel(server.target) as channel:
        kserve = pb_grpc.GRPCInferenceServiceStub(channel)
        labels = 'code="OK",method="ModelStreamInfer",model="lenet5",transport="grpc",version="1"'
        counted = "convserve_requests_total{" + labels + "}"
        before = _metric(server, counted)
        request = pb.ModelInferRequest(model_name="lenet5", id="s1")
        request.inputs.add(name="image", datatype="UINT8", shape=[1, 1, 32, 32])
        request.raw_input_contents.append(bytes(1024))
        assert [r.infer_response.id for r in kserve.ModelStreamInfer(iter([request, request]))] == [
            "s1",
            "s1",
        ]
    assert _metric(server, counted) == before + 2


def test_stream_messages_are_batched_together(model_repository, tmp_path):
    """A stream's messages run concurrently, so they merge into one run like separate clients."""
    server = start_server(model_repository, tmp_path / "log", {"CONVSERVE_MAX_QUEUE_DELAY": "0.5"})
    executions = 'convserve_executions_total{model="lenet5",version="1"}'
    try:
        with grpc.insecure_channel(server.target) as channel:
            kserve = pb_grpc.GRPCInferenceServiceStub(channel)
            requests = []
            for i in range(4):
                request = pb.ModelInferRequest(model_name="lenet5", id=f"m{i}")
                request.inputs.add(name="image", datatype="UINT8", shape=[1, 1, 32, 32])
                request.raw_input_contents.append(bytes(1024))
                requests.append(request)
            before = _metric(server, executions)
            answered = sorted(r.infer_response.id for r in kserve.ModelStreamInfer(iter(requests)))
            assert answered == ["m0", "m1", "m2", "m3"]
            assert _metric(server, executions) == before + 1
    finally:
        server.stop()
