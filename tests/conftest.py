"""Shared fixtures: a quick-trained LeNet-5 repository and a real server on free loopback ports."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from service.client import VisionClient

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))  # for drawing.py

#: The test model is the full-quality one (about 25 s on one core), seeded, so the tests see what users get.
SEED = 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def trained_lenet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository with one seeded LeNet-5 version, trained once for the whole run."""
    from training.train_classifier import run

    root = tmp_path_factory.mktemp("trained")
    repository = root / "models"
    run(seed=SEED, run_dir=root / "run", repository=repository, progress=False)
    return repository


@pytest.fixture(scope="session")
def trained_captioner(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A quick captioner (one epoch on small splits, about 30 s), trained once for the whole run:
    its run folder under `run`, its repository under `models`."""
    from training.train_captioner import run

    root = tmp_path_factory.mktemp("captioner")
    run(quick=True, epochs=1, run_dir=root / "run", repository=root / "models", progress=False)
    return root


@pytest.fixture(scope="session")
def trained_butd(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A quick captioner-butd (one detector epoch, two decoder epochs, small splits), trained once for
    the whole run: its run folder under `run`, its repository under `models`, and the run's metrics."""
    from training.train_butd import run

    root = tmp_path_factory.mktemp("butd")
    metrics = run(quick=True, run_dir=root / "run", repository=root / "models", progress=False)
    return root, metrics


@pytest.fixture(scope="session")
def trained_scenes_resnet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository with a quick scenes-resnet (a few epochs), trained once for the whole run."""
    from training.train_scenes_resnet import run

    root = tmp_path_factory.mktemp("scenes")
    run(quick=True, run_dir=root / "run", repository=root / "models", progress=False)
    return root / "models"


@pytest.fixture
def model_repository(trained_lenet: Path, tmp_path: Path) -> Path:
    """A private copy of the trained repository, for tests that change it."""
    copy = tmp_path / "models"
    shutil.copytree(trained_lenet, copy)
    return copy


@dataclass
class RunningServer:
    process: subprocess.Popen
    target: str
    metrics_url: str
    log_path: Path
    http_url: str
    health_target: str | None = None  # the plaintext health-only port, when start_server opened one

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)


def start_server(
    repository: Path,
    log_path: Path,
    extra_env: dict[str, str] | None = None,
    wait_for: str = "",
    plaintext_health: bool = False,
) -> RunningServer:
    """`convserve serve` in a subprocess; returns once health entry `wait_for` (overall: "") is SERVING.

    `plaintext_health`: also open the plaintext health-only port (CONVSERVE_HEALTH_PORT) and wait on
    it instead of the gRPC port (which may speak TLS or ask for tokens).
    """
    grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
    env = {**os.environ, "CONVSERVE_LOG_FORMAT": "json", **(extra_env or {})}
    health_port = free_port() if plaintext_health else None
    if health_port is not None:
        env["CONVSERVE_HEALTH_PORT"] = str(health_port)
    command = [
        sys.executable, "-m", "service", "serve",
        "--model-repository", str(repository),
        "--host", "127.0.0.1",
        "--grpc-port", str(grpc_port),
        "--http-port", str(http_port),
        "--metrics-port", str(metrics_port),
    ]  # fmt: skip
    log_file = open(log_path, "w")  # noqa: SIM115 - the child process writes it
    process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    log_file.close()
    server = RunningServer(
        process,
        f"127.0.0.1:{grpc_port}",
        f"http://127.0.0.1:{metrics_port}/metrics",
        log_path,
        f"http://127.0.0.1:{http_port}",
        f"127.0.0.1:{health_port}" if health_port is not None else None,
    )
    wait_until_serving(server, wait_for)
    return server


def wait_until_serving(server: RunningServer, service: str = "", timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    with VisionClient(server.health_target or server.target, timeout=2) as client:
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                raise RuntimeError(f"server exited with {server.process.returncode}:\n{server.log()}")
            try:
                if client.health(service) == "SERVING":
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise TimeoutError(f"server not SERVING after {timeout} s:\n{server.log()}")


@pytest.fixture(scope="session")
def server(trained_lenet: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """One server for the read-only tests of the session."""
    running = start_server(trained_lenet, tmp_path_factory.mktemp("server") / "server.log")
    yield running
    running.stop()


@pytest.fixture
def client(server: RunningServer) -> Iterator[VisionClient]:
    with VisionClient(server.target) as c:
        yield c
