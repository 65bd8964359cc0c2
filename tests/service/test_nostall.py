"""One client cannot stall the server: bounded parsing off the event loop, decoding that honours
deadlines, clipped echoes, bounded connections (issue 28).

In-process checks of the pieces first (fast), then two servers on loopback: one that a client
attacks while a second client measures gRPC ServerLive and a lenet5 ModelInfer, and one for the
decode that must stop when its client's deadline passed (the server's CPU time measured).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures.process import BrokenProcessPool
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import yaml
from conftest import RunningServer, start_server
from PIL import Image
from toy_models import toy_generator

from service._proto.convserve.v1 import vision_pb2 as vpb
from service._proto.convserve.v1 import vision_pb2_grpc as vgrpc
from service._proto.inference import grpc_predict_v2_pb2 as kpb
from service._proto.inference import grpc_predict_v2_pb2_grpc as kgrpc
from service.codecs.cost import Codec, Stop, Work, checkpoint, stopping
from service.codecs.images import decode_images, image_work
from service.dataplane.calls import new_request_id
from service.domain import EncodedImage
from service.engine.decoding import DecodePool
from service.errors import (
    MAX_MESSAGE_CHARS,
    Cancelled,
    DeadlineExceeded,
    InvalidArgument,
    QueueFull,
    clip,
    clip_list,
    clip_message,
)
from service.observability import metrics
from service.security.auth import check_model_name
from service.transports.http.json_tensors import decode_header, decode_latents, parse_json, whole_number
from service.transports.http.routes import build_app

#: What the issue asks of every error message and log line for an oversized input.
ONE_KB = 1024
#: The probe's p99 while the attacks run.
P99_LIMIT = 0.1


def _palette_png(width: int, height: int) -> bytes:
    """A palette PNG of one colour: about 2 KB for 4000 x 4000 pixels."""
    buffer = io.BytesIO()
    Image.new("P", (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


# In-process ----------------------------------------------------------------------------------


def test_clipped_echoes_stay_short() -> None:
    assert len(clip("x" * 10_000_000)) < 100
    assert len(clip(b"x" * 10_000_000)) < 100
    shown = clip_list(list(range(1_000_000)))
    assert shown.startswith("[0, 1, 2, 3, 4, 5, 6, 7, ...]") and "1000000 items" in shown
    assert clip("lenet5") == "'lenet5'"
    assert len(clip_message("y" * 10_000_000)) <= MAX_MESSAGE_CHARS


def test_names_and_request_ids_are_matched_whole() -> None:
    with pytest.raises(InvalidArgument):
        check_model_name("lenet5\n")
    check_model_name("lenet5")
    assert new_request_id("abc\n") != "abc\n"
    assert new_request_id("abc") == "abc"


@pytest.mark.parametrize(
    "body",
    [
        {"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": [["a"], "b"]}]},  # ragged BYTES
        {"inputs": [{"name": "x", "shape": [2], "datatype": "BYTES", "data": [1, 2]}]},
        {"inputs": [], "outputs": ["x"]},
        {"inputs": [], "parameters": [1]},
        {"inputs": [], "id": 5},
        {"inputs": [{"name": 5, "shape": [1], "datatype": "FP32", "data": [1]}]},
        {"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [[[[1]]], [[[2]]]]}]},  # deeper
        {"inputs": [{"name": "x", "shape": [2, 1], "datatype": "FP32", "data": [[1], 2]}]},  # ragged
        {"inputs": [{"name": "x", "shape": [10**9], "datatype": "FP32", "data": [1]}]},  # claims too much
        {"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1, None]}]},  # not NaN
        {"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": ["1.5"]}]},
        {"inputs": [], "outputs": {}},
        {"inputs": [], "outputs": 0},
    ],
)
def test_malformed_json_bodies_are_invalid(body: dict) -> None:
    raw = json.dumps(body).encode()
    with pytest.raises(InvalidArgument) as caught:
        decode_header(raw, len(raw), "m", "")
    assert len(str(caught.value)) < ONE_KB


#: A JSON integer longer than Python converts to an int (4300 digits since 3.11).
LONG_INTEGER = b"9" * 5000


@pytest.mark.parametrize(
    "decode",
    [
        lambda raw: decode_header(raw, len(raw), "m", ""),
        decode_latents,
        parse_json,
    ],
    ids=["header", "latents", "parse"],
)
@pytest.mark.parametrize(
    "raw",
    [
        b'{"inputs": [{"name": "x", "shape": [1], "datatype": "INT64", "data": [' + LONG_INTEGER + b"]}]}",
        b'{"latents": [[' + LONG_INTEGER + b"]]}",
        LONG_INTEGER,
    ],
    ids=["in-data", "in-latents", "alone"],
)
def test_json_integers_too_long_to_convert_are_invalid(decode: Callable[[bytes], object], raw: bytes) -> None:
    with pytest.raises(InvalidArgument, match="more than 4300 digits"):
        decode(raw)


def test_deeply_nested_json_is_invalid() -> None:
    raw = b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(InvalidArgument):
        decode_header(raw, len(raw), "m", "")


def test_integers_beyond_int64_are_invalid() -> None:
    assert whole_number(str(2**63 - 1), "top_k") == 2**63 - 1
    with pytest.raises(InvalidArgument):
        whole_number(str(2**63), "top_k")
    with pytest.raises(InvalidArgument):
        whole_number("9" * 5000, "count")


def test_images_are_judged_by_the_pixels_their_headers_declare() -> None:
    small = [EncodedImage(_palette_png(28, 28))]
    huge = [EncodedImage(_palette_png(4000, 4000))]
    assert image_work(small).inline
    assert len(huge[0].data) < 16 * 1024 and not image_work(huge).inline
    with pytest.raises(InvalidArgument, match="max_request_pixels"):
        list(decode_images(huge * 7, 16_000_000, 64_000_000))


def test_decoding_stops_between_images_once_the_deadline_passed() -> None:
    images = [EncodedImage(_palette_png(1000, 1000))] * 50
    decoded = []

    def step() -> None:
        for image in decode_images(images, 16_000_000, 10**9):
            decoded.append(image)
            time.sleep(0.01)

    with pytest.raises(DeadlineExceeded):
        stopping(Stop(time.monotonic() + 0.05), step)
    assert 1 <= len(decoded) < 20


def test_decode_pool_refuses_when_full_and_counts_it() -> None:
    async def main() -> None:
        pool = DecodePool(threads=1, queue=0, processes=0)
        release = threading.Event()
        work = Work(Codec.IMAGE, 10**9)
        try:
            first = asyncio.ensure_future(pool.run(work, lambda: release.wait(5)))
            await asyncio.sleep(0.05)
            before = metrics.DECODE_POOL_REFUSED._value.get()
            with pytest.raises(QueueFull):
                await pool.run(work, lambda: None)
            assert metrics.DECODE_POOL_REFUSED._value.get() == before + 1
            release.set()
            await first
            assert pool.pending == 0
            await pool.run(work, lambda: None)  # room again
        finally:
            release.set()
            pool.close()

    asyncio.run(main())


def test_decode_pool_stops_cancelled_work_at_its_next_checkpoint() -> None:
    steps: list[int] = []

    def step() -> None:
        for i in range(200):
            checkpoint()
            steps.append(i)
            time.sleep(0.01)

    async def main() -> None:
        pool = DecodePool(threads=1, queue=0, processes=0)
        try:
            task = asyncio.ensure_future(pool.run(Work(Codec.IMAGE, 10**9), step))
            await asyncio.sleep(0.1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            for _ in range(100):  # the thread notices at its next checkpoint
                if pool.pending == 0:
                    break
                await asyncio.sleep(0.01)
            assert pool.pending == 0
        finally:
            pool.close()

    asyncio.run(main())
    assert len(steps) < 30


def test_json_is_decoded_in_the_pool_process_which_comes_back_when_killed() -> None:
    raw = json.dumps({"inputs": [{"name": "x", "shape": [5000], "datatype": "FP32", "data": [1.0] * 5000}]})
    body = raw.encode()
    work = Work(Codec.JSON, len(body))
    assert work.in_process

    async def main() -> None:
        pool = DecodePool(threads=1, queue=4, processes=1)
        try:
            decoded = await pool.run(work, partial(decode_header, body, len(body), "m", ""))
            assert np.frombuffer(decoded.request.inputs[0].raw, np.float32).sum() == 5000
            for child in multiprocessing.active_children():
                os.kill(child.pid, signal.SIGKILL)  # as the OOM killer would
            with contextlib.suppress(BrokenProcessPool):
                await pool.run(work, partial(decode_header, body, len(body), "m", ""))
            decoded = await pool.run(work, partial(decode_header, body, len(body), "m", ""))
            assert len(decoded.request.inputs[0].raw) == 4 * 5000
        finally:
            pool.close()

    asyncio.run(main())


def test_stop_says_cancelled() -> None:
    stop = Stop()
    stop.cancelled.set()
    with pytest.raises(Cancelled):
        stop.check()


def _against_the_routes(check: Callable[[int], None], **options: Any) -> None:
    """`check(port)`, in a thread, against the HTTP routes without a data plane (what is refused
    before a request reaches one), served on loopback by aiohttp with its defaults."""
    from aiohttp.test_utils import TestServer

    async def main() -> None:
        server = TestServer(build_app(None, 1 << 20, **options))  # type: ignore[arg-type]  # no plane
        await server.start_server()
        try:
            await asyncio.to_thread(check, server.port)
        finally:
            await server.close()

    asyncio.run(main())


#: How long aiohttp still reads (and drops) a refused request's body before it closes the
#: connection, so that its client can read the answer (its `lingering_time`).
LINGERING_SECONDS = 10.0


def test_a_slow_body_is_answered_408_and_its_connection_closed() -> None:
    """A header, then one byte of the body every half second: 408 once the body timeout passed,
    and the connection closed after aiohttp's lingering time, not held as long as the client likes."""
    timeout = 1.0
    seen: dict[str, object] = {}

    def check(port: int) -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
            started, answer = time.monotonic(), b""
            s.settimeout(0.5)
            while time.monotonic() - started < timeout + LINGERING_SECONDS + 10:
                with contextlib.suppress(OSError):
                    s.sendall(b"x")
                try:
                    chunk = s.recv(4096)
                except TimeoutError:
                    continue
                except OSError:
                    chunk = b""
                if not chunk:
                    seen["closed"] = time.monotonic() - started
                    break
                seen.setdefault("answered", time.monotonic() - started)
                answer += chunk
            seen["answer"] = answer

    _against_the_routes(check, body_timeout=timeout)
    head, _, body = bytes(seen["answer"]).partition(b"\r\n\r\n")  # type: ignore[arg-type]
    assert head.startswith(b"HTTP/1.1 408") and b"Connection: close" in head, head
    assert "http_body_timeout_seconds" in json.loads(body)["error"]
    assert timeout <= seen["answered"] < timeout + 2, seen  # type: ignore[operator]
    assert seen["closed"] < timeout + LINGERING_SECONDS + 3, seen  # type: ignore[operator]


@pytest.mark.parametrize(
    "head",
    [
        b"POST /v2/models/m/infer HTTP/1.1\r\nContent-Length: 5000\r\n",
        b"POST /v2/models/m/infer HTTP/1.1\r\nContent-Length: 9000\r\n"
        b"Inference-Header-Content-Length: 2000\r\n",
        b"POST /v1/generate HTTP/1.1\r\nContent-Length: 5000\r\n",
        b"POST /v2/repository/index HTTP/1.1\r\nContent-Length: 100000\r\n",  # over 64 KiB
    ],
    ids=["infer", "infer-header", "generate", "repository"],
)
def test_json_declared_over_its_limit_is_refused_before_the_body_is_read(head: bytes) -> None:
    answers: list[bytes] = []

    def check(port: int) -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(head + b"Host: x\r\n\r\n")  # and no body: the answer must not wait for one
            answers.append(s.recv(4096))

    _against_the_routes(check, max_json_bytes=1000)
    head_answer, _, body = answers[0].partition(b"\r\n\r\n")
    assert head_answer.startswith(b"HTTP/1.1 413"), answers[0][:200]
    assert "over the limit" in json.loads(body)["error"]


class _FullPlane:
    """A data plane whose decode pool is always full."""

    async def offload(self, work: Work, job: Callable[[], object]) -> object:
        raise QueueFull("the decode pool and its queue are full; retry with backoff")


def test_a_full_queue_is_503_with_retry_after_over_http() -> None:
    """RESOURCE_EXHAUSTED goes out as Triton answers overload over HTTP: 503, with when to retry."""
    from aiohttp.test_utils import TestClient, TestServer

    async def main() -> None:
        async with TestClient(TestServer(build_app(_FullPlane(), 1 << 20))) as client:  # type: ignore[arg-type]
            answer = await client.post("/v2/models/m/infer", data=b'{"inputs": []}')
            assert answer.status == 503 and answer.headers["Retry-After"] == "1"
            assert "full" in (await answer.json())["error"]

    asyncio.run(main())


def test_traceback_log_lines_are_capped_to_their_last_frames() -> None:
    """A bug's traceback 300 frames deep whose message holds 1 MB: a log line of a few KiB that
    still says what failed and where, in either format."""
    from service.observability.logs import MAX_TRACEBACK_CHARS, JsonFormatter, TextFormatter

    source = "".join(f"def f{i}():\n    f{i + 1}()\n" for i in range(300))
    source += "def f300():\n    raise KeyError('k' * 1_000_000)\n"
    namespace: dict[str, Any] = {}
    exec(compile(source, "deep.py", "exec"), namespace)
    try:
        namespace["f0"]()
    except KeyError:
        failure = sys.exc_info()
    for formatter in (JsonFormatter(), TextFormatter()):
        record = logging.LogRecord("convserve", logging.ERROR, __file__, 1, "failed", None, failure)
        line = formatter.format(record)
        assert len(line) < MAX_TRACEBACK_CHARS + 1024, len(line)
        assert "Traceback (most recent call last):" in line and "lines cut" in line
        assert "in f300" in line and "KeyError: 'kkk" in line and "(1000012 characters)" in line


# Against a server ------------------------------------------------------------------------------


def _children_rss(server: RunningServer) -> int:
    """RSS in bytes of the server's child processes (the decode pool's JSON process)."""
    pid = server.process.pid
    total = 0
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        with contextlib.suppress(OSError, StopIteration):
            status = Path(f"/proc/{child}/status").read_text().splitlines()
            total += int(next(line for line in status if line.startswith("VmRSS")).split()[1]) * 1024
    return total


def _server_pid_stat(server: RunningServer) -> tuple[float, int, int]:
    """The server's CPU seconds (user + system), RSS in bytes and thread count."""
    pid = server.process.pid
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime
    status = Path(f"/proc/{pid}/status").read_text()
    rss = int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1]) * 1024
    threads = int(next(line for line in status.splitlines() if line.startswith("Threads")).split()[1])
    return ticks / 100, rss, threads  # USER_HZ is 100 on Linux


def _lenet_input() -> kpb.ModelInferRequest:
    request = kpb.ModelInferRequest(model_name="lenet5")
    request.inputs.add(name="image", datatype="UINT8", shape=[1, 1, 32, 32])
    request.raw_input_contents.append(bytes(32 * 32))
    return request


@pytest.fixture(scope="module")
def attacked(trained_lenet: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    repository = tmp_path_factory.mktemp("nostall") / "models"
    shutil.copytree(trained_lenet, repository)
    toy_generator(repository / "toygen" / "1" / "model.onnx", 64)
    manifest = {
        "name": "toygen",
        "kind": "generator",
        "labels": ["zero", "one"],
        "generator": {"latent_size": 64, "height": 8, "width": 8},
    }
    (repository / "toygen" / "config.yaml").write_text(yaml.safe_dump(manifest))
    env = {"CONVSERVE_HTTP_IDLE_TIMEOUT_SECONDS": "2", "CONVSERVE_REPOSITORY_POLL_SECONDS": "0"}
    server = start_server(repository, repository.parent / "server.log", env)
    yield server
    server.stop()


def _input_name(server: RunningServer) -> str:
    with urllib.request.urlopen(f"{server.http_url}/v2/models/lenet5", timeout=10) as answer:
        return json.load(answer)["inputs"][0]["name"]


def test_oversized_inputs_get_short_messages_and_log_lines(attacked: RunningServer) -> None:
    with grpc.insecure_channel(attacked.target, options=[("grpc.max_send_message_length", -1)]) as channel:
        kserve, vision = kgrpc.GRPCInferenceServiceStub(channel), vgrpc.VisionStub(channel)
        calls: list[Callable[[], object]] = [
            lambda: vision.Generate(vpb.GenerateRequest(model="toygen", count=2, labels=[7] * 2_000_000)),
            lambda: vision.Generate(vpb.GenerateRequest(model="toygen", count=1, labels=[7])),
            lambda: kserve.ModelInfer(kpb.ModelInferRequest(model_name="m" * 8_000_000)),
            lambda: kserve.ModelMetadata(kpb.ModelMetadataRequest(name="lenet5", version="v" * 1_000_000)),
        ]
        shaped = _lenet_input()
        del shaped.inputs[0].shape[:]
        shaped.inputs[0].shape.extend([1] * 1_000_000)
        calls.append(lambda: kserve.ModelInfer(shaped))
        named = _lenet_input()
        named.inputs[0].name = "n" * 1_000_000
        calls.append(lambda: kserve.ModelInfer(named))
        for call in calls:
            with pytest.raises(grpc.RpcError) as caught:
                call()
            assert caught.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
            assert len(caught.value.details().encode()) <= ONE_KB, caught.value.details()[:200]
    missing = urllib.request.Request(f"{attacked.http_url}/v2/models/{'q' * 4000}")
    with pytest.raises(urllib.error.HTTPError) as http_error:
        urllib.request.urlopen(missing, timeout=10)
    assert http_error.value.code == 404
    body = http_error.value.read()
    assert len(body) <= ONE_KB and b"lenet5" not in body  # the model asked for, not the list
    assert http_error.value.headers["Server"] == "convserve"
    time.sleep(0.5)  # the access log is written after the answer
    lines = attacked.log().splitlines()
    assert max(len(line.encode()) for line in lines) <= ONE_KB


def test_http_malformed_input_is_4xx(attacked: RunningServer) -> None:
    name = _input_name(attacked)
    cases = [
        ("/v2/models/lenet5/infer", b"[" * 200_000),
        ("/v2/models/lenet5/infer", json.dumps({"inputs": [], "outputs": ["x"]}).encode()),
        ("/v2/models/lenet5/infer", json.dumps({"inputs": [], "parameters": [1]}).encode()),
        (
            "/v2/models/lenet5/infer",
            json.dumps(
                {"inputs": [{"name": name, "shape": [1], "datatype": "BYTES", "data": [["a"], "b"]}]}
            ).encode(),
        ),
        (f"/v1/classify?top_k={2**70}", _palette_png(28, 28)),
        (f"/v1/generate?model=toygen&count={2**70}", b""),
        ("/v2/models/lenet5%0A/infer", b"{}"),
    ]
    for path, body in cases:
        request = urllib.request.Request(attacked.http_url + path, data=body, method="POST")
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=30)
        assert 400 <= caught.value.code < 500, (path, caught.value.code, caught.value.read()[:200])
    infer = b'{"inputs": [{"name": "%s", "shape": [1], "datatype": "INT64", "data": [%s]}]}'
    refused = [  # each: 400 with what was wrong, on the event loop and in the decode process
        ("/v2/models/lenet5/infer", infer % (name.encode(), LONG_INTEGER), "more than 4300 digits"),
        ("/v2/models/lenet5/infer", infer % (name.encode(), LONG_INTEGER) + b" " * 20_000, "4300 digits"),
        ("/v2/repository/index", b'{"ready": ' + LONG_INTEGER + b"}", "more than 4300 digits"),
        ("/v1/generate?model=toygen", b'{"latents": [[' + LONG_INTEGER + b"]]}", "more than 4300 digits"),
        ("/v2/models/lenet5/infer", infer % (name.encode(), b"null"), "not null or text"),
        ("/v2/models/lenet5/infer", b'{"inputs": [], "outputs": {}}', '"outputs" must be a list'),
    ]
    for path, body, message in refused:
        request = urllib.request.Request(attacked.http_url + path, data=body, method="POST")
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=30)
        answer = caught.value.read().decode()
        assert caught.value.code == 400 and message in json.loads(answer)["error"], (path, answer[:200])


#: The second client, in a process of its own so that the test's own threads (the attacks) do not
#: delay it: ServerLive and a lenet5 ModelInfer, one after the other, each timed, until stdin closes.
PROBE = """
import json, sys, threading, time
import grpc
from service._proto.inference import grpc_predict_v2_pb2 as kpb
from service._proto.inference import grpc_predict_v2_pb2_grpc as kgrpc
stub = kgrpc.GRPCInferenceServiceStub(grpc.insecure_channel(sys.argv[1]))
request = kpb.ModelInferRequest(model_name="lenet5")
request.inputs.add(name="image", datatype="UINT8", shape=[1, 1, 32, 32])
request.raw_input_contents.append(bytes(32 * 32))
stub.ModelInfer(request, timeout=10)
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
latencies, failures = [], []
print("ready", flush=True)
while not stop.is_set():
    for call in (lambda: stub.ServerLive(kpb.ServerLiveRequest(), timeout=5),
                 lambda: stub.ModelInfer(request, timeout=5)):
        started = time.perf_counter()
        try:
            call()
        except grpc.RpcError as exc:
            failures.append(exc.code().name + ": " + str(exc.details()))
        latencies.append(time.perf_counter() - started)
    time.sleep(0.005)
print(json.dumps({"latencies": latencies, "failures": failures}), flush=True)
"""


class _Probe:
    """The second client's process; `latencies` and `failures` once it stopped."""

    def __init__(self, target: str) -> None:
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self._process = subprocess.Popen(
            [sys.executable, "-c", PROBE, target], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )

    def __enter__(self) -> _Probe:
        assert self._process.stdout is not None and self._process.stdout.readline().strip() == "ready"
        return self

    def __exit__(self, *_: object) -> None:
        output, _ = self._process.communicate(timeout=30)
        found = json.loads(output.strip().splitlines()[-1])
        self.latencies, self.failures = found["latencies"], found["failures"]

    def p99(self) -> float:
        return float(np.percentile(self.latencies, 99))


def _post(url: str, body: bytes, headers: dict[str, str] | None = None) -> int:
    request = urllib.request.Request(url, data=body, method="POST", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _nested_json(name: str, numbers: int) -> bytes:
    head = json.dumps({"name": name, "shape": [numbers, 1], "datatype": "UINT8"})[:-1]
    return b'{"inputs": [' + head.encode() + b', "data": [' + b"[0]," * (numbers - 1) + b"[0]]}]}"


def _slow_headers(port: int, count: int, seconds: float) -> list[socket.socket]:
    """`count` connections that send a request header a few bytes at a time."""
    sockets = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"POST /v2/models/lenet5/infer HTTP/1.1\r\nHost: x\r\n")
        sockets.append(s)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for s in sockets:
            with contextlib.suppress(OSError):  # closed by the server: what it should do
                s.sendall(b"X-Slow: 1\r\n")
        time.sleep(0.5)
    return sockets


def _closed_by_server(s: socket.socket) -> bool:
    """Whether the server closed the connection (after any answer it wrote: a 503 or a 408)."""
    s.settimeout(0.1)
    try:
        while s.recv(4096):
            pass
        return True
    except (TimeoutError, BlockingIOError):
        return False
    except OSError:
        return True


def test_one_client_cannot_stall_the_server(attacked: RunningServer) -> None:
    """Four attacks at once; the probe's p99 stays under 100 ms, nothing fails, RSS stays bounded."""
    name = _input_name(attacked)
    http_port = int(attacked.http_url.rsplit(":", 1)[1])
    metrics_port = int(attacked.metrics_url.split(":")[2].split("/")[0])
    big_json = _nested_json(name, 15_000_000)[: 60 * 1000 * 1000]  # 60 MB: over max_json_bytes
    large_json = _nested_json(name, 2_000_000)  # 8 MB: parsed, in the decode process
    png = _palette_png(4000, 4000)
    _, rss_before, threads_before = _server_pid_stat(attacked)
    peak = {"rss": rss_before, "threads": threads_before, "children": _children_rss(attacked)}
    statuses: dict[str, list[object]] = {"json": [], "png": [], "slow": [], "metrics": []}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            _, rss, threads = _server_pid_stat(attacked)
            peak["rss"], peak["threads"] = max(peak["rss"], rss), max(peak["threads"], threads)
            peak["children"] = max(peak["children"], _children_rss(attacked))
            time.sleep(0.05)

    def json_attack() -> None:
        url = f"{attacked.http_url}/v2/models/lenet5/infer"
        statuses["json"].append(_post(url, big_json))
        for _ in range(3):
            statuses["json"].append(_post(url, large_json))

    def png_attack() -> None:
        with grpc.insecure_channel(attacked.target) as channel:
            vision = vgrpc.VisionStub(channel)
            for count in (7, 3, 7, 3):
                images = [vpb.Image(encoded=png)] * count
                try:
                    vision.Classify(vpb.ClassifyRequest(model="lenet5", images=images), timeout=30)
                    statuses["png"].append("OK")
                except grpc.RpcError as exc:
                    statuses["png"].append(exc.code().name)

    def slow_attack() -> None:
        sockets = _slow_headers(http_port, 200, 4.0)  # the idle timeout is 2 s here
        statuses["slow"].append(sum(_closed_by_server(s) for s in sockets))
        for s in sockets:
            s.close()

    def metrics_attack() -> None:
        sockets = [socket.create_connection(("127.0.0.1", metrics_port), timeout=5) for _ in range(200)]
        time.sleep(3.0)
        statuses["metrics"].append(sum(_closed_by_server(s) for s in sockets))
        for s in sockets:
            s.close()

    attacks = [threading.Thread(target=f) for f in (json_attack, png_attack, slow_attack, metrics_attack)]
    sampler = threading.Thread(target=sample)
    with _Probe(attacked.target) as probe:
        sampler.start()
        for attack in attacks:
            attack.start()
        for attack in attacks:
            attack.join(90)
        stop.set()
        sampler.join()
    p99, worst = probe.p99(), max(probe.latencies)
    print(
        f"\nprobe: {len(probe.latencies)} calls, p99 {p99 * 1000:.1f} ms, worst {worst * 1000:.1f} ms; "
        f"RSS {rss_before / 2**20:.0f} -> peak {peak['rss'] / 2**20:.0f} MiB; "
        f"JSON process peak {peak['children'] / 2**20:.0f} MiB; threads {threads_before} -> peak "
        f"{peak['threads']}; {statuses}"
    )
    assert not probe.failures, probe.failures[:5]
    assert p99 < P99_LIMIT, f"p99 {p99 * 1000:.1f} ms"
    assert statuses["json"][0] == 413 and all(s == 400 for s in statuses["json"][1:]), statuses
    assert statuses["png"] == ["INVALID_ARGUMENT", "OK", "INVALID_ARGUMENT", "OK"], statuses
    assert statuses["slow"] == [200], "slow headers outlived the idle timeout"
    assert statuses["metrics"] == [200], "idle metrics connections outlived the idle timeout"
    assert peak["threads"] < threads_before + 20, "a thread per connection"
    assert peak["rss"] < rss_before + 1024 * 2**20, "the documented bound: 1 GiB over the idle server"
    assert peak["children"] < 1024 * 2**20, "the documented bound of the JSON process: 1 GiB"
    # and afterwards it serves normally
    with grpc.insecure_channel(attacked.target) as channel:
        kgrpc.GRPCInferenceServiceStub(channel).ModelInfer(_lenet_input(), timeout=10)
    with urllib.request.urlopen(attacked.metrics_url, timeout=10) as answer:
        assert b"convserve_decode_pool_pending" in answer.read()


@pytest.fixture(scope="module")
def decoding(trained_lenet: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    env = {
        "CONVSERVE_MAX_REQUEST_PIXELS": str(10**10),
        "CONVSERVE_DECODE_THREADS": "1",
        "CONVSERVE_REPOSITORY_POLL_SECONDS": "0",
    }
    server = start_server(trained_lenet, tmp_path_factory.mktemp("decoding") / "server.log", env)
    yield server
    server.stop()


def test_decoding_stops_when_the_deadline_passed(decoding: RunningServer) -> None:
    """A request of 40 large images whose deadline passes after a few: the server stops decoding
    within about one image's time (its CPU time measured), not after all forty."""
    png = _palette_png(4000, 4000)
    with grpc.insecure_channel(decoding.target) as channel:
        vision = vgrpc.VisionStub(channel)
        one = vpb.ClassifyRequest(model="lenet5", images=[vpb.Image(encoded=png)])
        vision.Classify(one, timeout=30)  # warm
        cpu_before, _, _ = _server_pid_stat(decoding)
        started = time.perf_counter()
        vision.Classify(one, timeout=30)
        one_image = max(_server_pid_stat(decoding)[0] - cpu_before, time.perf_counter() - started)
        many = vpb.ClassifyRequest(model="lenet5", images=[vpb.Image(encoded=png)] * 40)
        deadline = 3 * one_image
        with pytest.raises(grpc.RpcError) as caught:
            vision.Classify(many, timeout=deadline)
        assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        cpu_at_deadline, _, _ = _server_pid_stat(decoding)
        time.sleep(max(2.0, 10 * one_image))  # what 40 images would have taken, or more
        after = _server_pid_stat(decoding)[0] - cpu_at_deadline
    print(f"\none image: {one_image * 1000:.0f} ms of CPU; after the deadline: {after * 1000:.0f} ms")
    assert after <= one_image + 0.15, (
        f"{after:.2f} s of CPU after the deadline; one image takes {one_image:.2f} s"
    )


def test_metrics_port_can_ask_for_a_token() -> None:
    from aiohttp.test_utils import TestClient, TestServer

    from service.security.auth import AuthPolicy
    from service.server import metrics_app
    from service.settings import Settings

    policy = AuthPolicy.from_settings(Settings(auth_tokens="secret"))

    async def main() -> None:
        async with TestClient(TestServer(metrics_app(policy))) as client:
            refused = await client.get("/metrics")
            assert refused.status == 401 and refused.headers["WWW-Authenticate"] == "Bearer"
            answered = await client.get("/metrics", headers={"Authorization": "Bearer secret"})
            assert answered.status == 200 and "convserve_decode_pool_pending" in await answered.text()
        async with TestClient(TestServer(metrics_app(None))) as client:
            assert (await client.get("/metrics")).status == 200

    asyncio.run(main())


def test_http_clients_that_hang_up_cancel_their_decoding(decoding: RunningServer) -> None:
    """Six HTTP Classify calls of a large image queue for the one decode thread; their clients hang
    up: the queued ones never start and are CANCELLED. A call whose image was decoded before its
    client hung up may have answered (OK): on a busy machine the hang-up comes after one decode."""
    png = _palette_png(4000, 4000)
    port = int(decoding.http_url.rsplit(":", 1)[1])
    head = b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nx-request-id: hangup-%d\r\nContent-Length: %d\r\n\r\n"
    sockets = []
    for i in range(6):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(head % (i, len(png)) + png)
        sockets.append(s)
    time.sleep(0.3)
    cpu_at_hangup, _, _ = _server_pid_stat(decoding)
    for s in sockets:
        s.close()
    time.sleep(2.0)
    after = _server_pid_stat(decoding)[0] - cpu_at_hangup
    lines = [json.loads(line) for line in decoding.log().splitlines() if '"hangup-' in line]
    codes = sorted(line["code"] for line in lines)
    print(f"\nafter six clients hung up: {after * 1000:.0f} ms of CPU; {codes}")
    assert len(codes) == 6 and set(codes) <= {"OK", "CANCELLED"}, codes
    assert codes.count("CANCELLED") >= 4, "queued decodes must not run once their clients are gone"
    assert after < 0.6, "the queued decodes ran for nobody"


# The ports themselves ---------------------------------------------------------------------------

#: The HTTP connection limit of the bare server below.
MAX_CONNECTIONS = 4


@pytest.fixture(scope="module")
def bare(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """A server without models (quick to start), taking at most MAX_CONNECTIONS HTTP connections."""
    root = tmp_path_factory.mktemp("bare")
    (root / "models").mkdir()
    env = {"CONVSERVE_HTTP_MAX_CONNECTIONS": str(MAX_CONNECTIONS), "CONVSERVE_DECODE_PROCESSES": "0"}
    server = start_server(root / "models", root / "server.log", env)
    yield server
    server.stop()


def _ports(server: RunningServer) -> tuple[int, int]:
    """The server's HTTP and metrics ports."""
    return int(server.http_url.rsplit(":", 1)[1]), int(server.metrics_url.split(":")[2].split("/")[0])


def _answer(port: int, request: bytes) -> bytes:
    """Everything the server writes back to `request` until it closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(request)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    return answer


def test_http_connections_beyond_the_limit_are_refused(bare: RunningServer) -> None:
    port, _ = _ports(bare)
    held = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(MAX_CONNECTIONS)]
    try:
        refused = _answer(port, b"")
        assert refused.startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in refused, refused[:200]
        held.pop().close()  # room for one again, once the server has seen it go
        live = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        for _ in range(50):
            answer = _answer(port, live)
            if answer.startswith(b"HTTP/1.1 200"):
                break
            time.sleep(0.05)
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    finally:
        for s in held:
            s.close()


def test_no_answer_names_python_or_aiohttp(bare: RunningServer) -> None:
    """Neither port's answers (the routes', aiohttp's own 400 for a request it cannot parse, the
    metrics) carry aiohttp's default Server header with the Python and aiohttp versions."""
    requests = [
        b"GARBAGE\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"GET /nowhere HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    ]
    for port in _ports(bare):
        for request in requests:
            head = _answer(port, request).partition(b"\r\n\r\n")[0]
            servers = [line for line in head.split(b"\r\n") if line.lower().startswith(b"server:")]
            assert servers == [b"Server: convserve"], (port, request, head)


def test_metrics_host_binds_the_metrics_port_alone(tmp_path: Path) -> None:
    """metrics_host=127.0.0.1 with host=0.0.0.0: the metrics port on loopback only, the others not."""
    from service.server import ConvserveServer
    from service.settings import Settings

    settings = Settings(
        model_repository=tmp_path,
        host="0.0.0.0",
        metrics_host="127.0.0.1",
        grpc_port=0,
        http_port=0,
        metrics_port=0,
        decode_processes=0,
        repository_poll_seconds=0,
    )

    async def main() -> None:
        server = ConvserveServer(settings)
        await server.start()
        try:
            assert server._metrics is not None and server._http is not None
            assert server._metrics.addresses == [("127.0.0.1", server.metrics_port)]
            assert server._http.addresses == [("0.0.0.0", server.http_port)]
            answer = await asyncio.to_thread(
                _answer, server.metrics_port, b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            assert answer.startswith(b"HTTP/1.1 200")
        finally:
            await server.stop()

    asyncio.run(main())


def test_metrics_auth_without_tokens_refuses_to_start(tmp_path: Path) -> None:
    env = {key: value for key, value in os.environ.items() if not key.startswith("CONVSERVE_")}
    env["CONVSERVE_METRICS_AUTH"] = "true"
    command = [
        sys.executable, "-m", "service", "serve",
        "--model-repository", str(tmp_path),
        "--host", "127.0.0.1",
        "--grpc-port", "0",
        "--http-port", "0",
        "--metrics-port", "0",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode != 0
    assert "metrics_auth needs tokens to check" in done.stdout + done.stderr
