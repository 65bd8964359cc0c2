"""The readiness guard: with CONVSERVE_MIN_MODELS, a server that has fewer models ready than it was told
to expect is not ready (overall health entry, KServe ServerReady over HTTP), and becomes ready when
enough have arrived; an unload that takes it below the minimum makes it not ready again."""

from __future__ import annotations

import json
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import start_server, wait_until_serving

from service.client import VisionClient
from service.settings import Settings


def http_ready(base_url: str) -> tuple[int, bool]:
    """GET /v2/health/ready: the status code and the body's `ready`."""
    try:
        with urllib.request.urlopen(f"{base_url}/v2/health/ready", timeout=5) as response:
            return response.status, json.load(response)["ready"]
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)["ready"]


def unload(base_url: str, model: str) -> None:
    request = urllib.request.Request(
        f"{base_url}/v2/repository/models/{model}/unload",
        data=b"{}",
        headers={"Content-Type": "application/json"},  # state-changing routes take JSON only
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200


def publish_copy_of_lenet(repository: Path, name: str, staging: Path) -> None:
    """A second model: lenet5's files under another name, moved in whole as a trainer publishes."""
    staged = staging / name
    shutil.copytree(repository / "lenet5", staged)
    config = yaml.safe_load((staged / "config.yaml").read_text())
    config["name"] = name
    (staged / "config.yaml").write_text(yaml.safe_dump(config))
    staged.rename(repository / name)


def wait_for_health(client: VisionClient, service: str, status: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while client.health(service) != status:
        assert time.monotonic() < deadline, f"health {service!r} not {status} after {timeout} s"
        time.sleep(0.2)


def test_fewer_models_than_expected_is_not_ready_until_enough_arrive(model_repository, tmp_path) -> None:
    env = {
        "CONVSERVE_MIN_MODELS": "2",
        "CONVSERVE_REPOSITORY_POLL_SECONDS": "0.2",
        "CONVSERVE_REPOSITORY_CONTROL": "enabled",
    }
    server = start_server(model_repository, tmp_path / "log", env, wait_for="lenet5")
    try:
        with VisionClient(server.target) as client:
            assert client.health("liveness") == "SERVING"
            time.sleep(1.0)  # loading is over: readiness must stay down, not merely be late
            assert client.health("") == "NOT_SERVING"
            assert http_ready(server.http_url) == (503, False)
            assert "min_models: 1 model(s) ready (lenet5) of at least 2 expected" in server.log()

            staging = tmp_path / "staging"
            staging.mkdir()
            publish_copy_of_lenet(model_repository, "digits", staging)
            wait_until_serving(server, "", timeout=30)
            assert http_ready(server.http_url) == (200, True)

            unload(server.http_url, "digits")  # below the minimum again: out of the endpoints
            wait_for_health(client, "", "NOT_SERVING")
            assert http_ready(server.http_url) == (503, False)
            assert client.health("lenet5") == "SERVING"  # the model that is left still answers
    finally:
        assert server.stop() == 0


def test_a_minimum_the_repository_meets_is_ready(model_repository, tmp_path) -> None:
    server = start_server(model_repository, tmp_path / "log", {"CONVSERVE_MIN_MODELS": "1"})
    try:
        assert http_ready(server.http_url) == (200, True)
    finally:
        assert server.stop() == 0


def test_an_empty_repository_with_a_minimum_is_never_ready(tmp_path) -> None:
    """The image or volume without its models: alive, never ready."""
    empty = tmp_path / "models"
    empty.mkdir()
    server = start_server(empty, tmp_path / "log", {"CONVSERVE_MIN_MODELS": "1"}, wait_for="liveness")
    try:
        with VisionClient(server.target) as client:
            time.sleep(1.0)
            assert client.health("") == "NOT_SERVING"
        assert "min_models: 0 model(s) ready (none)" in server.log()
    finally:
        assert server.stop() == 0


def test_min_models_is_a_count_of_zero_or_more(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().min_models == 0  # no minimum unless asked: an empty repository is ready
    monkeypatch.setenv("CONVSERVE_MIN_MODELS", "-1")
    with pytest.raises(ValueError, match="min_models"):
        Settings()
