"""Server lifecycle: models arriving later, new versions, failures, require_gpu, ports, SIGTERM."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

import grpc
import onnxruntime
import pytest
import yaml
from conftest import free_port, start_server, wait_until_serving
from drawing import draw_digit, png_bytes

from service._proto.convserve.v1 import vision_pb2 as pb
from service.client import VisionClient


def _versions(client: VisionClient) -> dict[str, tuple[str, str]]:
    """version -> (state name, reason) of the only model."""
    (model,) = client.list_models().models
    return {v.version: (pb.ModelState.Name(v.state), v.reason) for v in model.versions}


def _wait_for(predicate, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise TimeoutError("condition not reached")


def test_model_arriving_later_is_served_without_restart(model_repository, tmp_path) -> None:
    """Readiness is per model: a model published while the server runs joins with its own health entry."""
    staged = tmp_path / "staged"
    shutil.move(model_repository / "lenet5", staged)
    server = start_server(model_repository, tmp_path / "log", {"CONVSERVE_REPOSITORY_POLL_SECONDS": "0.2"})
    try:
        with VisionClient(server.target) as client:
            assert client.health("") == "SERVING"
            assert list(client.list_models().models) == []
            shutil.move(staged, model_repository / "lenet5")
            wait_until_serving(server, "lenet5", timeout=30)
            assert (
                client.classify([png_bytes(draw_digit("2"))], top_k=1).results[0].predictions[0].label == "2"
            )
    finally:
        assert server.stop() == 0


def test_new_version_replaces_the_old_one(model_repository, tmp_path) -> None:
    server = start_server(model_repository, tmp_path / "log", {"CONVSERVE_REPOSITORY_POLL_SECONDS": "0.2"})
    try:
        with VisionClient(server.target) as client:
            shutil.copytree(model_repository / "lenet5" / "1", model_repository / "lenet5" / ".incoming")
            (model_repository / "lenet5" / ".incoming").rename(model_repository / "lenet5" / "2")
            _wait_for(lambda: _versions(client).get("2", ("",))[0] == "MODEL_STATE_READY")
            assert _versions(client)["1"][0] == "MODEL_STATE_UNLOADED"
            assert client.classify([png_bytes(draw_digit("5"))]).version == "2"
            with pytest.raises(grpc.RpcError) as info:
                client.classify([png_bytes(draw_digit("5"))], version="1")
            assert info.value.code() is grpc.StatusCode.UNAVAILABLE
            assert "superseded" in info.value.details()
    finally:
        server.stop()


def test_broken_model_is_marked_failed_and_others_stay_ready(model_repository, tmp_path) -> None:
    broken = model_repository / "broken"
    shutil.copytree(model_repository / "lenet5", broken)
    (broken / "config.yaml").write_text(
        (broken / "config.yaml").read_text().replace("name: lenet5", "name: broken")
    )
    (broken / "1" / "model.onnx").write_bytes(b"not an onnx file")
    captioner = model_repository / "captioner"
    (captioner / "1").mkdir(parents=True)
    manifest = yaml.safe_load((model_repository / "lenet5" / "config.yaml").read_text())
    manifest.update(name="captioner", kind="captioner", adaptation={"kind": "resize"})
    manifest["captioner"] = {
        "vocabulary": ["<pad>", "<start>", "<end>", "<unk>", "a"],
        "start_token": 1,
        "end_token": 2,
        "max_length": 8,
        "grid": [8, 8],
    }
    (captioner / "config.yaml").write_text(yaml.safe_dump(manifest))
    server = start_server(model_repository, tmp_path / "log")
    try:
        with VisionClient(server.target) as client:
            assert client.health("") == "SERVING"  # every model at start is loaded or marked failed
            assert client.health("lenet5") == "SERVING"
            assert client.health("broken") == "NOT_SERVING"
            with pytest.raises(grpc.RpcError) as info:
                client.classify([png_bytes(draw_digit("1"))], model="broken")
            assert info.value.code() is grpc.StatusCode.UNAVAILABLE
            assert "failed" in info.value.details()
            models = {m.name: m for m in client.list_models().models}
            assert models["broken"].versions[0].reason.startswith("onnxruntime could not load")
            reason = models["captioner"].versions[0].reason
            assert reason == "encoder.onnx is missing in version folder 1"  # names the missing file
    finally:
        server.stop()


def test_require_gpu_fails_readiness_instead_of_falling_back(model_repository, tmp_path) -> None:
    model = model_repository / "lenet5" / "1" / "model.onnx"
    session = onnxruntime.InferenceSession(
        str(model), providers=["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    has_cuda = session.get_providers()[0] == "CUDAExecutionProvider"
    server = start_server(model_repository, tmp_path / "log", {"CONVSERVE_REQUIRE_GPU": "1"}, "liveness")
    try:
        with VisionClient(server.target) as client:
            _wait_for(lambda: client.list_models().models[0].versions[0].state != pb.MODEL_STATE_LOADING)
            (version,) = client.list_models().models[0].versions
            if has_cuda:
                assert version.provider == "CUDAExecutionProvider"
                assert client.health("lenet5") == "SERVING"
                _wait_for(lambda: client.health("") == "SERVING")
            else:
                assert "require_gpu" in version.reason
                assert client.health("lenet5") == "NOT_SERVING"
                time.sleep(1.0)  # loading is over: readiness must stay down, not merely be late
                assert client.health("") == "NOT_SERVING"  # a GPU pod without CUDA takes no traffic
                assert "require_gpu: CUDA is not active for lenet5/1" in server.log()
    finally:
        server.stop()


def test_invalid_config_is_reported_not_fatal(model_repository, tmp_path) -> None:
    bad = model_repository / "bad"
    (bad / "1").mkdir(parents=True)
    (bad / "config.yaml").write_text("name: bad\nkind: teapot\n")
    server = start_server(model_repository, tmp_path / "log")
    try:
        with VisionClient(server.target) as client:
            models = {m.name: m for m in client.list_models().models}
            assert "invalid" not in models["lenet5"].versions[0].reason
            assert models["bad"].versions[0].state == pb.MODEL_STATE_FAILED
            assert "kind" in models["bad"].versions[0].reason
            with pytest.raises(grpc.RpcError) as info:
                client.classify([png_bytes(draw_digit("1"))], model="bad")
            assert info.value.code() is grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop()


def test_sigterm_stops_gracefully(model_repository, tmp_path) -> None:
    server = start_server(model_repository, tmp_path / "log")
    assert server.stop() == 0
    assert '"message": "stopped"' in server.log()


def test_busy_port_is_an_error_not_a_silent_second_server(model_repository, tmp_path) -> None:
    """grpcio enables SO_REUSEPORT by default; the server turns it off so a busy port fails loudly."""
    first = start_server(model_repository, tmp_path / "first.log")
    try:
        port = first.target.rsplit(":", 1)[1]
        second = subprocess.run(
            [sys.executable, "-m", "service", "serve", "--model-repository", str(model_repository),
             "--host", "127.0.0.1", "--grpc-port", port, "--http-port", "-1",
             "--metrics-port", str(free_port())],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert second.returncode == 1
        assert f"cannot listen on 127.0.0.1:{port}" in second.stderr
    finally:
        first.stop()


def test_new_version_with_a_broken_config_fails_alone(model_repository, tmp_path) -> None:
    """A bad config.yaml arriving with a new version fails that version; the loaded one keeps serving."""
    server = start_server(model_repository, tmp_path / "log", {"CONVSERVE_REPOSITORY_POLL_SECONDS": "0.2"})
    try:
        with VisionClient(server.target) as client:
            config = model_repository / "lenet5" / "config.yaml"
            config.write_text(config.read_text().replace("kind: classifier", "kind: teapot"))
            shutil.copytree(model_repository / "lenet5" / "1", model_repository / "lenet5" / ".incoming")
            (model_repository / "lenet5" / ".incoming").rename(model_repository / "lenet5" / "2")
            _wait_for(lambda: "2" in _versions(client))
            state, reason = _versions(client)["2"]
            assert state == "MODEL_STATE_FAILED"
            assert "invalid config.yaml" in reason
            assert client.classify([png_bytes(draw_digit("5"))]).version == "1"
            assert client.health("lenet5") == "SERVING"
    finally:
        server.stop()


def test_serve_without_onnxruntime_says_which_extra_to_install(model_repository) -> None:
    block_import = "import sys; sys.modules['onnxruntime'] = None"  # `import onnxruntime` now fails
    code = f"{block_import}; from service.cli import main; sys.exit(main(sys.argv[1:]))"
    result = subprocess.run(
        [sys.executable, "-c", code, "serve", "--model-repository", str(model_repository)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    assert "convserve[gpu]" in result.stderr
    assert "convserve[cpu]" in result.stderr


@pytest.mark.parametrize(
    "policy, served",
    [("{all: true}", {"1", "2"}), ("{specific: [1]}", {"1"}), ("{latest: 1}", {"2"})],
)
def test_version_policy_decides_what_is_served(model_repository, tmp_path, policy, served) -> None:
    model_dir = model_repository / "lenet5"
    shutil.copytree(model_dir / "1", model_dir / "2")
    config = model_dir / "config.yaml"
    manifest = yaml.safe_load(config.read_text())
    manifest["version_policy"] = yaml.safe_load(policy)
    config.write_text(yaml.safe_dump(manifest))
    server = start_server(model_repository, tmp_path / "log")
    try:
        with VisionClient(server.target) as client:
            ready = {v for v, (state, _) in _versions(client).items() if state == "MODEL_STATE_READY"}
            assert ready == served
            for version in served:
                assert client.classify([png_bytes(draw_digit("2"))], version=version).version == version
    finally:
        server.stop()
