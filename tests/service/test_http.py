"""KServe v2 over HTTP/REST: tritonclient.http unmodified, the same answers as gRPC, errors, task route."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml
from drawing import draw_digit, png_bytes
from prometheus_client.parser import text_string_to_metric_families

from service._proto.inference import grpc_predict_v2_pb2 as pb
from service._proto.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from service.client import VisionClient
from training.data.digits import load_digit_splits

HERE = Path(__file__).parent
REPO = HERE.parents[1]


def _call(
    url: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict, bytes]:
    request = urllib.request.Request(
        url, data=body, headers=headers or {}, method="POST" if body is not None else "GET"
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def test_tritonclient_http_unmodified(server, tmp_path) -> None:
    test = load_digit_splits().test
    np.save(tmp_path / "images.npy", np.ascontiguousarray(test.images[:12]))
    done = subprocess.run(
        [sys.executable, str(HERE / "tritonclient_http_calls.py"), server.http_url.removeprefix("http://"),
         str(tmp_path / "images.npy")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert [seen[k] for k in ("live", "ready", "model_ready", "unknown_ready")] == [True, True, True, False]
    assert seen["server"]["name"] == "convserve"
    assert seen["metadata"]["inputs"][0] == {"name": "image", "datatype": "UINT8", "shape": [-1, 1, 32, 32]}
    assert seen["config"]["max_batch_size"] == 64
    with VisionClient(server.target) as client:
        expected = [r.predictions[0].index for r in client.classify(list(test.native[:12]), top_k=1).results]
    assert seen["binary_classes"] == expected
    assert seen["json_classes"] == expected


def test_same_request_same_answer_over_http_and_grpc(server) -> None:
    images = load_digit_splits().test.images[:4]
    body = {
        "id": "same",
        "inputs": [
            {
                "name": "image",
                "datatype": "UINT8",
                "shape": list(images.shape),
                "data": images.ravel().tolist(),
            }
        ],
    }
    status, _, raw = _call(server.http_url + "/v2/models/lenet5/infer", json.dumps(body).encode())
    assert status == 200
    answer = json.loads(raw)
    assert (answer["id"], answer["model_version"]) == ("same", "1")
    over_http = np.array(answer["outputs"][0]["data"], np.float32).reshape(answer["outputs"][0]["shape"])
    with grpc.insecure_channel(server.target) as channel:
        request = pb.ModelInferRequest(model_name="lenet5")
        request.inputs.add(name="image", datatype="UINT8", shape=images.shape)
        request.raw_input_contents.append(images.tobytes())
        response = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    over_grpc = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(over_http.shape)
    np.testing.assert_array_equal(over_http, over_grpc)


def test_binary_tensor_extension(server) -> None:
    images = load_digit_splits().test.images[:2]
    header = json.dumps(
        {
            "inputs": [{"name": "image", "datatype": "UINT8", "shape": [2, 1, 32, 32],
                        "parameters": {"binary_data_size": images.nbytes}}],
            "parameters": {"binary_data_output": True},
        }
    ).encode()  # fmt: skip
    status, headers, raw = _call(
        server.http_url + "/v2/models/lenet5/versions/1/infer",
        header + images.tobytes(),
        {"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"},
    )
    assert status == 200
    length = int(headers["Inference-Header-Content-Length"])
    answer = json.loads(raw[:length])
    (output,) = answer["outputs"]
    assert output["parameters"]["binary_data_size"] == 2 * 10 * 4
    logits = np.frombuffer(raw[length:], np.float32).reshape(output["shape"])
    assert logits.shape == (2, 10)


def test_errors_have_the_protocol_status_and_the_grpc_message(server) -> None:
    status, _, raw = _call(server.http_url + "/v2/models/nope")
    assert status == 404
    assert "model 'nope' not found" in json.loads(raw)["error"]
    bad = {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 1, 28, 28], "data": [0] * 784}]}
    status, _, raw = _call(server.http_url + "/v2/models/lenet5/infer", json.dumps(bad).encode())
    assert status == 400
    http_message = json.loads(raw)["error"]
    with grpc.insecure_channel(server.target) as channel:
        request = pb.ModelInferRequest(model_name="lenet5")
        request.inputs.add(name="image", datatype="UINT8", shape=[1, 1, 28, 28])
        request.raw_input_contents.append(bytes(784))
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    assert http_message == info.value.details()
    status, _, raw = _call(server.http_url + "/v2/models/lenet5/infer", b"{not json")
    assert status == 400
    assert "not valid JSON" in json.loads(raw)["error"]


def test_health_and_metadata_routes(server) -> None:
    assert _call(server.http_url + "/v2/health/live")[0] == 200
    assert _call(server.http_url + "/v2/health/ready")[0] == 200
    assert _call(server.http_url + "/v2/models/lenet5/ready")[0] == 200
    assert _call(server.http_url + "/v2/models/nope/ready")[0] == 404  # unknown: a 4xx, as the protocol asks
    status, headers, raw = _call(server.http_url + "/v2")
    assert (status, json.loads(raw)["name"]) == (200, "convserve")
    assert json.loads(raw)["extensions"] == [
        "binary_tensor_data",
        "classification",
        "model_configuration",
        "model_repository",
        "model_repository(unload_dependents)",
        "statistics",
    ]
    assert len(headers["x-request-id"]) == 32
    status, _, raw = _call(server.http_url + "/v2/models/stats")  # every model's, Triton's route
    assert status == 200
    assert [s["name"] for s in json.loads(raw)["model_stats"]] == ["lenet5"]


def test_repository_index_reads_its_request_strictly_on_both_transports(server) -> None:
    """`ready` is a JSON boolean ("false" would be true if read loosely); other fields, and a
    repository by name over gRPC, are refused, not ignored."""
    index = server.http_url + "/v2/repository/index"
    assert _call(index, b'{"ready": true}')[0] == 200
    for body, message in (
        (b'{"ready": "false"}', "ready must be true or false (a JSON boolean), got 'false'"),
        (
            b'{"ready": false, "repository_name": "m"}',
            "the index request takes only 'ready', not ['repository_name']",
        ),
    ):
        status, _, raw = _call(index, body)
        assert (status, json.loads(raw)["error"]) == (400, message)
    with grpc.insecure_channel(server.target) as channel:
        other = pb.RepositoryIndexRequest(repository_name="elsewhere")
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.GRPCInferenceServiceStub(channel).RepositoryIndex(other, timeout=30)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == "repository_name is not supported: the server has one repository"


def test_errors_are_plain_application_json(server) -> None:
    """Exactly `application/json` (no charset): the KServe SDK reads the server's text only then."""
    for url, body in ((server.http_url + "/v2/models/nope", None), (server.http_url + "/v1/classify", b"x")):
        status, headers, raw = _call(url, body)
        assert status in (400, 404)
        assert headers["Content-Type"] == "application/json"
        assert set(json.loads(raw)) == {"error"}


def _infer_json(server, body: dict) -> tuple[int, dict]:
    status, _, raw = _call(server.http_url + "/v2/models/lenet5/infer", json.dumps(body).encode())
    return status, json.loads(raw)


def test_integer_inputs_take_whole_json_numbers_only(server) -> None:
    image = {"name": "image", "datatype": "UINT8", "shape": [1, 1, 32, 32]}
    for floats in ([0.5] * 1024, [7.0] * 1024):  # 7.0 is whole, but a JSON float: refused too
        status, answer = _infer_json(server, {"inputs": [{**image, "data": floats}]})
        assert status == 400, floats[0]
        assert answer["error"] == "input 'image': UINT8 data must be whole numbers, got float64 values"
    status, answer = _infer_json(server, {"inputs": [{**image, "data": [300] * 1024}]})
    assert status == 400
    assert _infer_json(server, {"inputs": [{**image, "data": [7] * 1024}]})[0] == 200


def test_an_outputs_own_binary_data_wins_over_binary_data_output(server) -> None:
    image = {"name": "image", "datatype": "UINT8", "shape": [1, 1, 32, 32], "data": [0] * 1024}
    body = {
        "inputs": [image],
        "outputs": [{"name": "logits", "parameters": {"binary_data": False}}],
        "parameters": {"binary_data_output": True},
    }
    status, answer = _infer_json(server, body)
    assert status == 200
    assert len(answer["outputs"][0]["data"]) == 10


def test_classification_extension_over_http_and_grpc(server) -> None:
    images = load_digit_splits().test.images[:2]
    body = {
        "inputs": [
            {"name": "image", "datatype": "UINT8", "shape": [2, 1, 32, 32], "data": images.ravel().tolist()}
        ],
        "outputs": [{"name": "logits", "parameters": {"classification": 3}}],
    }
    status, answer = _infer_json(server, body)
    assert status == 200
    (output,) = answer["outputs"]
    assert (output["datatype"], output["shape"]) == ("BYTES", [2, 3])
    over_http = output["data"]
    with grpc.insecure_channel(server.target) as channel:
        request = pb.ModelInferRequest(model_name="lenet5")
        request.inputs.add(name="image", datatype="UINT8", shape=[2, 1, 32, 32])
        request.raw_input_contents.append(images.tobytes())
        wanted = request.outputs.add(name="logits")
        wanted.parameters["classification"].int64_param = 3
        response = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
        request.ClearField("outputs")
        logits = np.frombuffer(
            pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request).raw_output_contents[0], np.float32
        ).reshape(2, 10)
    raw = response.raw_output_contents[0]
    over_grpc, offset = [], 0
    while offset < len(raw):
        size = int.from_bytes(raw[offset : offset + 4], "little")
        over_grpc.append(raw[offset + 4 : offset + 4 + size].decode())
        offset += 4 + size
    assert over_grpc == over_http
    for row, found in zip(logits, np.reshape(over_http, (2, 3)), strict=True):
        best = np.argsort(-row, kind="stable")[:3]
        assert [entry.split(":")[1:] for entry in found] == [
            [str(i), str(i)] for i in best
        ]  # labels are "0".."9"
        assert [float(entry.split(":")[0]) for entry in found] == pytest.approx(row[best].tolist(), abs=1e-5)
    bad = {**body, "outputs": [{"name": "logits", "parameters": {"classification": 0}}]}
    assert _infer_json(server, bad)[0] == 400


def _answered(server, method: str, transport: str) -> dict[tuple[str, str], float]:
    """convserve_requests_total ("code", code) and convserve_request_failures_total ("reason", reason)
    of one method and transport, summed over models and versions, as the metrics port shows them."""
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    seen: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if sample.name == "convserve_requests_total" and (labels["method"], labels["transport"]) == (
                method,
                transport,
            ):
                key = ("code", labels["code"])
            elif sample.name == "convserve_request_failures_total":
                key = ("reason", labels["reason"])
            else:
                continue
            seen[key] = seen.get(key, 0.0) + sample.value
    return seen


def test_a_client_that_hangs_up_mid_body_is_cancelled_not_an_error(server) -> None:
    """Logged at INFO, counted as CANCELLED (never INTERNAL), and outside the error-rate alert."""
    import socket
    import time

    before = _answered(server, "ModelInfer", "http")
    host, port = server.http_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as connection:
        connection.sendall(
            b"POST /v2/models/lenet5/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100000\r\n\r\n{"inputs": ['
        )
        time.sleep(0.3)
    deadline = time.monotonic() + 10
    while '"code": "CANCELLED"' not in server.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    (line,) = [json.loads(x) for x in server.log().splitlines() if '"code": "CANCELLED"' in x]
    assert (line["level"], line["method"], line["error"]) == (
        "INFO",
        "POST /v2/models/lenet5/infer",
        "the client closed the connection",
    )
    assert "Traceback" not in server.log()
    after = _answered(server, "ModelInfer", "http")  # the log line is written after the metrics
    grown = {key: after[key] - before.get(key, 0.0) for key in after if after[key] != before.get(key, 0.0)}
    # requests_total by code (what the alert reads) and the failures by reason (docs/operations.md)
    assert grown == {("code", "CANCELLED"): 1.0, ("reason", "cancelled"): 1.0}, grown
    rules = yaml.safe_load((REPO / "deploy" / "prometheus" / "rules.yml").read_text())
    (errors,) = [
        rule["expr"]
        for group in rules["groups"]
        for rule in group["rules"]
        if rule.get("record") == "model:convserve_request_errors:rate5m"
    ]
    alerting = re.search(r'code=~"([^"]+)"', errors)[1]  # PromQL's =~ is anchored at both ends
    assert re.fullmatch(alerting, "INTERNAL") and not re.fullmatch(alerting, "CANCELLED"), errors


def test_classify_route_and_metrics_by_transport(server) -> None:
    status, _, raw = _call(server.http_url + "/v1/classify?top_k=2", png_bytes(draw_digit("4")))
    assert status == 200
    answer = json.loads(raw)
    assert (answer["model"], answer["predictions"][0]["label"], len(answer["predictions"])) == (
        "lenet5",
        "4",
        2,
    )
    status, _, raw = _call(server.http_url + "/v1/classify", b"garbage")
    assert status == 400
    assert json.loads(raw)["error"] == "image 0: image bytes are not a PNG, JPEG, BMP image (or are corrupt)"
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    assert 'code="OK",method="Classify",model="lenet5",transport="http",version="1"}' in text
    assert 'code="INVALID_ARGUMENT",method="Classify",model="lenet5",transport="http",version="1"}' in text
