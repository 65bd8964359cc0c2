"""perf_analyzer, the tool people benchmark KServe v2 servers with, runs against convserve over
gRPC and HTTP at concurrency 8 and 64 without errors. It aborts on server statistics whose compute
counts differ, so this also holds the statistics to Triton's per-request meaning."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import RunningServer

HOW_TO = (
    "perf_analyzer ships in tritonclient's wheel (the dev extra) and needs libb64 (Debian package "
    "libb64-0d: `make system-deps` installs it) and libcudart.so.12 (the nvidia-cuda-runtime-cu12 wheel "
    "in the dev extra: `make install`)"
)


def _perf_analyzer() -> tuple[Path, dict[str, str]]:
    """The binary beside the venv's python, and an environment in which its libraries load."""
    binary = Path(sys.executable).parent / "perf_analyzer"
    cudart = Path(sys.prefix).glob("lib/python3*/site-packages/nvidia/cuda_runtime/lib")
    found = [str(path) for path in cudart]
    if not binary.is_file() or not found:
        pytest.fail(f"perf_analyzer cannot start here ({binary}, libcudart {found}): {HOW_TO}")
    paths = [*found, os.environ.get("LD_LIBRARY_PATH", "")]
    return binary, {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join(p for p in paths if p)}


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_perf_analyzer_runs_at_concurrency_8_and_64(server: RunningServer, protocol: str) -> None:
    binary, env = _perf_analyzer()
    url = server.target if protocol == "grpc" else server.http_url.removeprefix("http://")
    command = [
        str(binary),
        "-m", "lenet5",
        "-u", url,
        "-i", protocol,
        "--concurrency-range", "8:64:56",  # 8, then 64
        "--measurement-mode", "count_windows",
        "--measurement-request-count", "200",
        "--max-trials", "4",
        "--stability-percentage", "100",  # these machines are shared: any stable-enough window will do
    ]  # fmt: skip
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    except FileNotFoundError as error:
        pytest.fail(f"perf_analyzer cannot start: {error}: {HOW_TO}")
    output = done.stdout + done.stderr
    if "error while loading shared libraries" in output:
        pytest.fail(f"perf_analyzer cannot start: {output.strip()}: {HOW_TO}")
    assert done.returncode == 0, output
    assert "Concurrency: 8, throughput:" in output and "Concurrency: 64, throughput:" in output, output
    assert "Server:" in output, "perf_analyzer read the server's statistics"
    assert "error" not in output.lower(), output
