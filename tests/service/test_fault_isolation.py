"""One bad request never fails another: the kinds' checks refuse what they can see before a batch
forms, and a batched run that still fails is split so that only the request that cannot run
fails. Statistics stay per request while that happens. A real server, real clients, small graphs."""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request
from collections.abc import Iterator

import aiohttp
import grpc
import numpy as np
import pytest
from conftest import RunningServer, start_server
from toy_models import LOOKUP_ROWS, lookup_model, toy_generator, write_config

from service._proto.convserve.v1 import vision_pb2, vision_pb2_grpc
from service._proto.inference import grpc_predict_v2_pb2 as pb
from service._proto.inference import grpc_predict_v2_pb2_grpc as pb_grpc

LATENT = 64
CLASSES = 10
GOOD = 70
#: Long enough for every request a test sends at once to join one batch.
QUEUE_DELAY = 0.5
TIMEOUT = 30


@pytest.fixture(scope="module")
def isolation_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """`dcgan` (a small generator with the real one's 10 classes and latent size), `lookup` (a
    graph that fails on an index beyond its table), `broken` (fails every run but the warm-up's)
    and `cold` (fails even its warm-up)."""
    repository = tmp_path_factory.mktemp("isolation") / "models"
    batching = {"max_batch_size": 128, "max_queue_delay": QUEUE_DELAY}
    toy_generator(repository / "dcgan" / "1" / "model.onnx", LATENT)
    write_config(
        repository / "dcgan",
        {
            "name": "dcgan",
            "kind": "generator",
            "labels": [str(d) for d in range(CLASSES)],
            "generator": {"latent_size": LATENT, "height": 8, "width": 8},
            "batching": batching,
        },
    )
    lookup_model(repository / "lookup" / "1" / "model.onnx")
    write_config(repository / "lookup", {"name": "lookup", "kind": "tensor", "batching": batching})
    lookup_model(repository / "broken" / "1" / "model.onnx", scale=1000)
    write_config(repository / "broken", {"name": "broken", "kind": "tensor", "batching": batching})
    lookup_model(repository / "cold" / "1" / "model.onnx", offset=1000)
    write_config(repository / "cold", {"name": "cold", "kind": "tensor"})
    server = start_server(repository, repository.parent / "server.log")
    yield server
    server.stop()


def _latent(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, LATENT), dtype=np.float32)


def _generator_request(seed: int, label: int) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="dcgan", id=str(seed))
    request.inputs.add(name="z", datatype="FP32", shape=[1, LATENT])
    request.inputs.add(name="label", datatype="INT64", shape=[1])
    request.raw_input_contents.extend([_latent(seed).tobytes(), np.array([label], np.int64).tobytes()])
    return request


def _generator_json(seed: int, label: int) -> dict:
    return {
        "id": str(seed),
        "inputs": [
            {"name": "z", "datatype": "FP32", "shape": [1, LATENT], "data": _latent(seed).ravel().tolist()},
            {"name": "label", "datatype": "INT64", "shape": [1], "data": [label]},
        ],
    }


# One call per transport and API: (seed, label) -> ("ok", image bytes) or (status, message).


async def _kserve_grpc(
    target: str, seed: int, label: int, timeout: float = TIMEOUT
) -> tuple[str, bytes | str]:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        try:
            response = await stub.ModelInfer(_generator_request(seed, label), timeout=timeout)
        except grpc.aio.AioRpcError as error:
            return error.code().name, error.details() or ""
        return "ok", response.raw_output_contents[0]


async def _kserve_http(url: str, seed: int, label: int) -> tuple[str, bytes | str]:
    infer = f"{url}/v2/models/dcgan/infer"
    async with (
        aiohttp.ClientSession() as session,
        session.post(infer, json=_generator_json(seed, label)) as answer,
    ):
        body = await answer.json()
        if answer.status != 200:
            return str(answer.status), body["error"]
        return "ok", np.array(body["outputs"][0]["data"], np.uint8).tobytes()


async def _task_grpc(target: str, seed: int, label: int) -> tuple[str, bytes | str]:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = vision_pb2_grpc.VisionStub(channel)
        request = vision_pb2.GenerateRequest(model="dcgan", count=1, labels=[label], seed=seed)
        try:
            response = await stub.Generate(request, timeout=TIMEOUT)
        except grpc.aio.AioRpcError as error:
            return error.code().name, error.details() or ""
        return "ok", response.images[0].png


async def _task_http(url: str, seed: int, label: int) -> tuple[str, bytes | str]:
    async with aiohttp.ClientSession() as session:
        query = {"model": "dcgan", "label": str(label), "seed": str(seed)}
        async with session.post(f"{url}/v1/generate", params=query) as answer:
            if answer.status != 200:
                return str(answer.status), (await answer.json())["error"]
            return "ok", await answer.read()


CALLS = {
    "kserve-grpc": (_kserve_grpc, "INVALID_ARGUMENT"),
    "kserve-http": (_kserve_http, "400"),
    "task-grpc": (_task_grpc, "INVALID_ARGUMENT"),
    "task-http": (_task_http, "400"),
}


@pytest.mark.parametrize("way", CALLS)
def test_one_out_of_range_label_among_70_good_requests_fails_alone(
    isolation_server: RunningServer, way: str
) -> None:
    call, invalid = CALLS[way]
    where = isolation_server.target if way.endswith("grpc") else isolation_server.http_url
    good = [(seed, seed % CLASSES) for seed in range(GOOD)]

    async def together() -> list[tuple[str, bytes | str]]:
        requests = [call(where, seed, label) for seed, label in good[:35]]
        requests += [call(where, 999, CLASSES)]  # label 10: beyond the classes 0..9
        requests += [call(where, seed, label) for seed, label in good[35:]]
        return await asyncio.gather(*requests)

    sample = good[::7]  # each alone waits the queue delay out: ten of them, not all seventy

    async def alone() -> list[tuple[str, bytes | str]]:
        return [await call(where, seed, label) for seed, label in sample]

    results = asyncio.run(together())
    failures = [result for result in results if result[0] != "ok"]
    assert len(failures) == 1, failures[:3]
    status, message = failures[0]
    assert status == invalid
    assert "label" in message and "0..9" in message and "10" in message, message
    assert results[35] == failures[0], "the bad request is the one that failed"
    answers = [answer for status, answer in results if status == "ok"]
    assert answers[::7] == [answer for _, answer in asyncio.run(alone())]


def _metric(server: RunningServer, name: str, model: str, cause: str = "") -> float:
    text = urllib.request.urlopen(server.metrics_url, timeout=TIMEOUT).read().decode()
    labels = (f'cause="{cause}",' if cause else "") + f'model="{model}",version="1"'  # sorted, as written
    found = re.search(rf"^{name}_total{{{labels}}} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def _lookup_request(model: str, index: int) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, id=str(index))
    request.inputs.add(name="index", datatype="INT64", shape=[1])
    request.raw_input_contents.append(np.array([index], np.int64).tobytes())
    return request


async def _lookups(target: str, model: str, indices: list[int]) -> list[np.ndarray | grpc.aio.AioRpcError]:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        async def one(index: int) -> np.ndarray | grpc.aio.AioRpcError:
            try:
                response = await stub.ModelInfer(_lookup_request(model, index), timeout=TIMEOUT)
            except grpc.aio.AioRpcError as error:
                return error
            return np.frombuffer(response.raw_output_contents[0], np.float32)

        return await asyncio.gather(*(one(i) for i in indices))


def test_a_poison_request_the_checks_cannot_see_fails_alone_in_the_batcher(
    isolation_server: RunningServer,
) -> None:
    retries_before = _metric(isolation_server, "convserve_batch_retries", "lookup")
    isolated_before = _metric(isolation_server, "convserve_isolated_failures", "lookup", cause="input")
    indices = [i % LOOKUP_ROWS for i in range(20)]
    indices.insert(7, LOOKUP_ROWS + 2)  # beyond the table: onnxruntime fails the run it is in
    results = asyncio.run(_lookups(isolation_server.target, "lookup", indices))
    for index, result in zip(indices, results, strict=True):
        if index >= LOOKUP_ROWS:
            assert isinstance(result, grpc.aio.AioRpcError)
            assert result.code() is grpc.StatusCode.INVALID_ARGUMENT  # onnxruntime: the input's fault
            assert "out of data bounds" in (result.details() or "")
        else:
            assert not isinstance(result, grpc.aio.AioRpcError), result.details()
            np.testing.assert_array_equal(result, [2 * index, 2 * index + 1])
    assert _metric(isolation_server, "convserve_batch_retries", "lookup") > retries_before
    assert (
        _metric(isolation_server, "convserve_isolated_failures", "lookup", cause="input")
        == isolated_before + 1
    )


def test_a_model_that_fails_every_run_fails_all_after_one_split(isolation_server: RunningServer) -> None:
    """16 requests in one batch: the batch and its two halves run (2 retries), not 2n-1 = 31 runs."""
    retries_before = _metric(isolation_server, "convserve_batch_retries", "broken")
    results = asyncio.run(_lookups(isolation_server.target, "broken", list(range(1, 17))))
    assert all(isinstance(r, grpc.aio.AioRpcError) for r in results)
    assert {r.code() for r in results} == {grpc.StatusCode.UNAVAILABLE}  # retry: not told its input was bad
    assert all("out of data bounds" not in (r.details() or "") for r in results)
    assert _metric(isolation_server, "convserve_batch_retries", "broken") == retries_before + 2
    assert _metric(isolation_server, "convserve_isolated_failures", "broken", cause="batch") == 16


def test_statistics_read_under_load_always_show_equal_compute_counts(isolation_server: RunningServer) -> None:
    """64 concurrent clients on `dcgan` (a few bad or expiring requests among them) while statistics
    are read over and over, over both transports."""
    reads: list[tuple[int, int, int, int, int]] = []

    def counts(stats: dict) -> tuple[int, int, int, int, int]:
        return tuple(  # type: ignore[return-value]
            int(stats[key].get("count", 0))
            for key in ("success", "queue", "compute_input", "compute_infer", "compute_output")
        )

    async def read_all(stop: asyncio.Event) -> None:
        async with (
            grpc.aio.insecure_channel(isolation_server.target) as channel,
            aiohttp.ClientSession() as web,
        ):
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            while not stop.is_set():
                answer = await stub.ModelStatistics(pb.ModelStatisticsRequest(name="dcgan"), timeout=TIMEOUT)
                stats = answer.model_stats[0].inference_stats
                reads.append(
                    (
                        stats.success.count,
                        stats.queue.count,
                        stats.compute_input.count,
                        stats.compute_infer.count,
                        stats.compute_output.count,
                    )
                )
                async with web.get(f"{isolation_server.http_url}/v2/models/dcgan/stats") as response:
                    body = json.loads(await response.text())
                reads.append(counts(body["model_stats"][0]["inference_stats"]))

    async def client(number: int) -> int:
        """Four requests; some clients also send a bad one, or one whose deadline passes in the queue."""
        ok = 0
        for round_ in range(4):
            status, _ = await _kserve_grpc(isolation_server.target, 1000 * number + round_, round_)
            ok += status == "ok"
        if number % 8 == 0:
            status, _ = await _kserve_grpc(isolation_server.target, number, CLASSES)
            assert status == "INVALID_ARGUMENT"
        if number % 8 == 1:
            status, _ = await _kserve_grpc(isolation_server.target, number, 1, timeout=QUEUE_DELAY / 5)
            assert status == "DEADLINE_EXCEEDED"
        return ok

    async def main() -> int:
        stop = asyncio.Event()
        reader = asyncio.create_task(read_all(stop))
        answered = sum(await asyncio.gather(*(client(n) for n in range(64))))
        stop.set()
        await reader
        return answered

    answered = asyncio.run(main())
    assert answered == 64 * 4
    assert len(reads) > 4
    assert reads[-1][0] >= answered, "every success counted (and no failure)"
    for success, queue, compute_input, compute_infer, compute_output in reads:
        assert success == queue == compute_input == compute_infer == compute_output
    assert reads == sorted(reads), "counts only grow"


def test_a_model_whose_warm_up_fails_is_failed_and_the_others_serve(isolation_server: RunningServer) -> None:
    with grpc.insecure_channel(isolation_server.target) as channel:
        index = pb_grpc.GRPCInferenceServiceStub(channel).RepositoryIndex(
            pb.RepositoryIndexRequest(), timeout=TIMEOUT
        )
    states = {(m.name, m.state): m.reason for m in index.models}
    assert "the warm-up run failed" in states[("cold", "UNAVAILABLE")]
    assert ("lookup", "READY") in states and ("dcgan", "READY") in states
