"""The bench's reference servers answer KServe v2 inference as the bench sends it, over gRPC and HTTP."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from conftest import free_port

from service._proto.inference import grpc_predict_v2_pb2 as pb
from service._proto.inference import grpc_predict_v2_pb2_grpc as pb_grpc

HEADER_LENGTH = "Inference-Header-Content-Length"


def images(rows: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (rows, 1, 32, 32), dtype=np.uint8)


def expected_logits(repository: Path, batch: np.ndarray) -> np.ndarray:
    (path,) = repository.glob("lenet5/*/model.onnx")
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": batch})[0]


def start(transport: str, mode: str, repository: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    command = [
        sys.executable, "-m", f"bench.reference.{transport}_server", "--mode", mode,
        "--model-repository", str(repository), "--model", "lenet5", "--port", str(port),
    ]  # fmt: skip
    return subprocess.Popen(command, stderr=subprocess.PIPE), port


@pytest.fixture
def reference(request, trained_lenet: Path) -> Iterator[tuple[str, str, int]]:
    transport, mode = request.param
    process, port = start(transport, mode, trained_lenet)
    try:
        yield transport, mode, port
    finally:
        process.kill()
        process.wait()


def infer_grpc(port: int, batch: np.ndarray) -> np.ndarray:
    request = pb.ModelInferRequest(model_name="lenet5")
    request.inputs.add(name="image", datatype="UINT8", shape=batch.shape)
    request.raw_input_contents.append(batch.tobytes())
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        answer = stub.ModelInfer(request, timeout=30, wait_for_ready=True)
    (output,) = answer.outputs
    assert (output.name, output.datatype) == ("logits", "FP32")
    return np.frombuffer(answer.raw_output_contents[0], np.float32).reshape(output.shape)


def infer_http(port: int, batch: np.ndarray) -> np.ndarray:
    tensor = {"name": "image", "datatype": "UINT8", "shape": list(batch.shape)}
    header = json.dumps({"inputs": [{**tensor, "parameters": {"binary_data_size": batch.nbytes}}]}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v2/models/lenet5/infer",
        data=header + batch.tobytes(),
        headers={HEADER_LENGTH: str(len(header)), "Content-Type": "application/octet-stream"},
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                body, length = response.read(), int(response.headers[HEADER_LENGTH])
            break
        except urllib.error.URLError:  # not listening yet
            assert time.monotonic() < deadline, "the reference HTTP server never answered"
            time.sleep(0.1)
    (output,) = json.loads(body[:length])["outputs"]
    assert (output["name"], output["datatype"]) == ("logits", "FP32")
    return np.frombuffer(body[length:], np.float32).reshape(output["shape"])


@pytest.mark.parametrize(
    "reference",
    [("grpc", "noop"), ("grpc", "naive"), ("http", "noop"), ("http", "naive")],
    indirect=True,
    ids=["grpc-noop", "grpc-naive", "http-noop", "http-naive"],
)
def test_reference_servers_answer_zeros_or_the_models_logits(reference, trained_lenet: Path) -> None:
    transport, mode, port = reference
    batch = images(3)
    logits = (infer_grpc if transport == "grpc" else infer_http)(port, batch)
    assert logits.shape == (3, 10)
    if mode == "noop":
        assert not logits.any()
    else:
        np.testing.assert_allclose(logits, expected_logits(trained_lenet, batch), rtol=1e-5, atol=1e-5)


def test_reference_servers_import_nothing_from_the_server() -> None:
    """What the import contract says, seen from a fresh interpreter: no `service` module is loaded."""
    code = (
        "import sys, bench.reference.grpc_server, bench.reference.http_server; "
        "print(sorted(m for m in sys.modules if m == 'service' or m.startswith('service.')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
