"""perf_analyzer (Triton's load generator, in tritonclient's wheel) against convserve's KServe v2 gRPC,
beside the suite's own load generator, where the binary and its libraries are found."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

#: What it needs besides the dev extra's wheel, for the message when it cannot start.
NEEDS = "libb64 (Debian libb64-0d, `make system-deps`) and libcudart.so.12 (nvidia-cuda-runtime-cu12)"


@dataclass(frozen=True)
class PerfPoint:
    model: str
    concurrency: int
    infer_per_second: float
    p50_ms: float
    p99_ms: float


def locate() -> tuple[Path, dict[str, str]] | str:
    """The binary beside this interpreter and an environment its libraries load in; or why not."""
    binary = Path(sys.executable).parent / "perf_analyzer"
    cudart = [str(p) for p in Path(sys.prefix).glob("lib/python3*/site-packages/nvidia/cuda_runtime/lib")]
    if not binary.is_file() or not cudart:
        return f"perf_analyzer not found beside {sys.executable} (it needs {NEEDS})"
    paths = [*cudart, os.environ.get("LD_LIBRARY_PATH", "")]
    return binary, {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join(p for p in paths if p)}


def measure(
    target: str,
    model: str,
    concurrency: int,
    seconds: float,
    pin: Callable[[], None] | None = None,
) -> PerfPoint | str:
    """One perf_analyzer run at `concurrency` (windows of `seconds`, the first three accepted as
    stable: the machine is shared); a point, or why there is none."""
    found = locate()
    if isinstance(found, str):
        return found
    binary, env = found
    with tempfile.TemporaryDirectory(prefix="perf-analyzer-") as folder:
        report = Path(folder) / "report.csv"
        command = [
            str(binary), "-m", model, "-u", target, "-i", "grpc",
            "--concurrency-range", f"{concurrency}:{concurrency}",
            "--measurement-interval", str(round(seconds * 1000)),
            "--max-trials", "3", "--stability-percentage", "100",
            "-f", str(report),
        ]  # fmt: skip
        try:
            done = subprocess.run(
                command, env=env, capture_output=True, text=True, timeout=120 + 10 * seconds, preexec_fn=pin
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            return f"perf_analyzer did not run: {error}"
        if done.returncode != 0 or not report.is_file():
            return f"perf_analyzer failed ({done.returncode}): {(done.stdout + done.stderr).strip()[-300:]}"
        (row,) = list(csv.DictReader(report.open()))
    return PerfPoint(
        model,
        concurrency,
        float(row["Inferences/Second"]),
        float(row["p50 latency"]) / 1000,
        float(row["p99 latency"]) / 1000,
    )


def measure_all(
    target: str,
    models: Sequence[str],
    concurrencies: Sequence[int],
    seconds: float,
    pin: Callable[[], None] | None = None,
) -> tuple[list[PerfPoint], str]:
    """Every model at every concurrency; stops at the first failure and says why."""
    points = []
    for model in models:
        for concurrency in concurrencies:
            point = measure(target, model, concurrency, seconds, pin)
            if isinstance(point, str):
                return points, point
            points.append(point)
    return points, ""
