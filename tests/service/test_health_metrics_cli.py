"""Health, ListModels, Prometheus metrics and the `convserve` CLI against a running server."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request

import grpc
import onnxruntime
import pytest
from drawing import draw_digit, png_bytes

from service.client import VisionClient


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "service", *args], capture_output=True, text=True, timeout=60
    )


def test_health_entries(client: VisionClient) -> None:
    assert client.health("") == "SERVING"
    assert client.health("liveness") == "SERVING"
    assert client.health("lenet5") == "SERVING"
    with pytest.raises(grpc.RpcError) as info:
        client.health("no-such-model")
    assert info.value.code() is grpc.StatusCode.NOT_FOUND


def test_list_models_reports_the_provider_really_in_use(client: VisionClient, trained_lenet) -> None:
    """The provider reported is the one onnxruntime really gives (here: the CPU fallback without a GPU)."""
    session = onnxruntime.InferenceSession(
        str(trained_lenet / "lenet5" / "1" / "model.onnx"),
        providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
    )
    (model,) = client.list_models().models
    assert (model.name, model.kind) == ("lenet5", "classifier")
    (version,) = model.versions
    assert version.version == "1"
    assert version.reason == ""
    assert version.provider == session.get_providers()[0]
    assert (model.input.height, model.input.width, model.input.channels) == (32, 32, 1)
    assert list(model.labels) == [str(d) for d in range(10)]


def test_metrics_count_requests_by_model_version_method_and_code(server, client: VisionClient) -> None:
    client.classify([png_bytes(draw_digit("1"))])
    with pytest.raises(grpc.RpcError):
        client.classify([b"junk"])
    series = (
        'convserve_requests_total{{code="{}",method="Classify",model="lenet5",transport="grpc",version="1"}}'
    )
    ok, bad = series.format("OK"), series.format("INVALID_ARGUMENT")
    # The status goes to the client before the call is counted: wait for the count.
    deadline = time.monotonic() + 10
    while True:
        text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
        samples = {
            line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line[:1] != "#"
        }
        if samples.get(bad, 0) >= 1 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert samples[ok] >= 1
    assert samples[bad] >= 1
    assert (
        samples[
            'convserve_request_duration_seconds_count{method="Classify",model="lenet5",transport="grpc",version="1"}'
        ]
        >= 2
    )
    labels = '{model="lenet5",version="1"}'
    executions = samples[f"convserve_executions_total{labels}"]
    assert samples[f"convserve_inferences_total{labels}"] >= executions >= 1
    assert samples[f"convserve_batch_size_count{labels}"] == executions
    assert samples[f"convserve_queue_duration_seconds_count{labels}"] >= 1
    assert samples[f"convserve_compute_input_duration_seconds_count{labels}"] >= 1
    assert samples[f"convserve_compute_output_duration_seconds_count{labels}"] >= 1
    assert samples[f"convserve_pending_requests{labels}"] == 0
    failures = 'convserve_request_failures_total{model="lenet5",reason="invalid_argument",version="1"}'
    assert samples[failures] >= 1
    assert samples['convserve_model_load_duration_seconds_count{model="lenet5"}'] == 1
    ready = [k for k, v in samples.items() if k.startswith("convserve_model_ready{") and v == 1]
    (series,) = ready
    assert 'model="lenet5"' in series
    assert 'version="1"' in series
    (provider,) = [v.provider for v in client.list_models().models[0].versions]
    assert f'provider="{provider}"' in series


def test_unknown_models_are_counted_under_one_label(server, client: VisionClient) -> None:
    """Label values stay bounded: made-up model names never become series."""
    for name in ("made-up-1", "made-up-2"):
        with pytest.raises(grpc.RpcError):
            client.classify([png_bytes(draw_digit("1"))], model=name)
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    assert "made-up" not in text
    assert (
        'convserve_requests_total{code="NOT_FOUND",method="Classify",model="unknown",transport="grpc",version=""}'
        in text
    )


def _classify_lines(server) -> list[dict]:
    lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    return [e for e in lines if e.get("message") == "rpc" and e.get("method", "").endswith("/Classify")]


def test_access_log_is_json_with_request_id(server, client: VisionClient) -> None:
    before = len(_classify_lines(server))
    client.classify([png_bytes(draw_digit("0"))])
    deadline = time.monotonic() + 5  # access lines are written in blocks, within 0.1 s
    while len(rpcs := _classify_lines(server)) == before:
        assert time.monotonic() < deadline, "the call's access log line never came"
        time.sleep(0.05)
    entry = rpcs[-1]
    assert len(entry["request_id"]) == 32
    assert entry["model"] == "lenet5"
    assert entry["code"] == "OK"
    assert entry["duration_ms"] > 0


def test_cli_classify_json(server, tmp_path) -> None:
    path = tmp_path / "digit.png"
    draw_digit("9", size=300, pen=20).save(path)
    result = _cli("classify", str(path), "--json", "--target", server.target)
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["image"] == str(path)
    assert (record["model"], record["version"]) == ("lenet5", "1")
    assert record["predictions"][0]["label"] == "9"
    assert set(record["predictions"][0]) == {"label", "index", "score"}
    assert len(record["predictions"]) == 3


def test_cli_classify_text_and_errors(server, tmp_path) -> None:
    path = tmp_path / "digit.png"
    draw_digit("4").save(path)
    result = _cli("classify", str(path), "--target", server.target)
    assert result.returncode == 0
    assert result.stdout.startswith(f"{path}: 4")
    missing = _cli("classify", str(path), "--model", "nope", "--target", server.target)
    assert missing.returncode == 1
    assert "NOT_FOUND" in missing.stderr


def test_cli_models_and_health(server) -> None:
    models = _cli("models", "--json", "--target", server.target)
    assert models.returncode == 0, models.stderr
    (entry,) = json.loads(models.stdout)
    assert entry["name"] == "lenet5"
    assert entry["versions"][0]["state"] == "READY"  # the name the docs use, as in the text output
    text = _cli("models", "--target", server.target)
    assert text.returncode == 0, text.stderr
    assert text.stdout.splitlines()[:2] == [
        "lenet5  kind=classifier  input=1x32x32 L",
        "  version 1: READY  " + entry["versions"][0]["provider"],
    ]
    health = _cli("health", "--target", server.target)
    assert (health.returncode, health.stdout.strip()) == (0, "SERVING")
    unknown = _cli("health", "--service", "nope", "--target", server.target)
    assert unknown.returncode == 1
    assert "no health entry 'nope'" in unknown.stderr and "liveness" in unknown.stderr


def test_cli_models_line_of_a_model_without_an_image_input() -> None:
    from service._proto.convserve.v1 import vision_pb2 as pb
    from service.cli import _model_line

    assert _model_line(pb.ModelInfo(name="mynet", kind="tensor")) == "mynet  kind=tensor"
    image = pb.InputSpec(channels=3, height=64, width=64, color_mode="RGB")
    assert (
        _model_line(pb.ModelInfo(name="s", kind="classifier", input=image))
        == "s  kind=classifier  input=3x64x64 RGB"
    )


def test_cli_health_fails_when_nothing_listens() -> None:
    from conftest import free_port

    result = _cli("health", "--target", f"127.0.0.1:{free_port()}", "--timeout", "1")
    assert result.returncode == 1


def test_cli_version() -> None:
    from service import __version__

    result = _cli("--version")
    assert result.stdout.strip() == f"convserve {__version__}"
