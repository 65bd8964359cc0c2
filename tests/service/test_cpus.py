"""onnxruntime's threads follow the CPUs the process may use: its affinity and its cgroup CPU quota."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from service.settings import cgroup_cpu_quota

#: A child that makes a session as the server does and reports the threads it added. A first session
#: with one intra-op thread (no pool) starts what onnxruntime starts once per process.
CHILD = """
import dataclasses, json, os, sys
from pathlib import Path
from service.engine.sessions import ModelSession
from service.server import session_options
from service.settings import Settings, usable_cpus
threads = lambda: len(os.listdir("/proc/self/task"))
options = session_options(Settings(providers=["CPUExecutionProvider"]))
first = ModelSession(Path(sys.argv[1]), dataclasses.replace(options, intra_op_threads=1))
before = threads()
session = ModelSession(Path(sys.argv[1]), options)
print(json.dumps({"cpus": usable_cpus(), "intra_op": options.intra_op_threads, "added": threads() - before}))
"""


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_takes_the_smallest_quota_on_the_path(tmp_path: Path) -> None:
    write(tmp_path / "self", "0::/kubepods/pod1/ctr\n")
    root = tmp_path / "cgroup"
    write(root / "cpu.max", "max 100000\n")
    write(root / "kubepods/cpu.max", "400000 100000\n")
    write(root / "kubepods/pod1/cpu.max", "150000 100000\n")
    write(root / "kubepods/pod1/ctr/cpu.max", "max 100000\n")
    assert cgroup_cpu_quota(tmp_path / "self", root) == 1.5


def test_cgroup_v2_inside_a_namespace_reads_the_containers_own_limit(tmp_path: Path) -> None:
    write(tmp_path / "self", "0::/\n")
    write(tmp_path / "cgroup/cpu.max", "50000 100000\n")
    assert cgroup_cpu_quota(tmp_path / "self", tmp_path / "cgroup") == 0.5


def test_cgroup_v1_quota_and_unlimited(tmp_path: Path) -> None:
    write(tmp_path / "self", "4:memory:/x\n3:cpu,cpuacct:/docker/abc\n0::/\n")
    group = tmp_path / "cgroup/cpu,cpuacct/docker/abc"
    write(group / "cpu.cfs_quota_us", "250000\n")
    write(group / "cpu.cfs_period_us", "100000\n")
    assert cgroup_cpu_quota(tmp_path / "self", tmp_path / "cgroup") == 2.5
    write(group / "cpu.cfs_quota_us", "-1\n")
    assert cgroup_cpu_quota(tmp_path / "self", tmp_path / "cgroup") is None


def test_no_cgroup_information_means_no_quota(tmp_path: Path) -> None:
    assert cgroup_cpu_quota(tmp_path / "missing", tmp_path) is None


def session_threads(model: Path, preexec) -> dict[str, int]:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(model)],
        capture_output=True,
        text=True,
        preexec_fn=preexec,
        timeout=120,
        env={k: v for k, v in os.environ.items() if not k.startswith("CONVSERVE_")},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


@pytest.fixture
def lenet_onnx(trained_lenet: Path) -> Path:
    (path,) = trained_lenet.glob("lenet5/*/model.onnx")
    return path


def test_pinned_to_one_cpu_a_session_starts_no_pool_threads(lenet_onnx: Path) -> None:
    first = min(os.sched_getaffinity(0))
    pinned = session_threads(lenet_onnx, lambda: os.sched_setaffinity(0, {first}))
    assert pinned == {"cpus": 1, "intra_op": 1, "added": 0}
    if len(os.sched_getaffinity(0)) >= 2:  # the same session on two CPUs: one pool thread beside the caller
        two = sorted(os.sched_getaffinity(0))[:2]
        both = session_threads(lenet_onnx, lambda: os.sched_setaffinity(0, set(two)))
        assert (both["intra_op"], both["added"]) == (2, 1)


def test_a_fractional_cpu_quota_counts_as_one_cpu(lenet_onnx: Path) -> None:
    """A cgroup v1 CPU quota of half a CPU, where this machine lets the tests create one (root)."""
    base = Path("/sys/fs/cgroup/cpu")
    if not (base / "cpu.cfs_quota_us").exists() or not os.access(base, os.W_OK):
        pytest.skip("no writable cgroup v1 cpu hierarchy here (needs root)")
    group = base / f"convserve-test-{uuid.uuid4().hex[:8]}"
    group.mkdir()
    try:
        (group / "cpu.cfs_period_us").write_text("100000")
        (group / "cpu.cfs_quota_us").write_text("50000")
        cpus = os.sched_getaffinity(0)

        def enter() -> None:
            os.sched_setaffinity(0, cpus)
            (group / "cgroup.procs").write_text(str(os.getpid()))

        assert session_threads(lenet_onnx, enter) == {"cpus": 1, "intra_op": 1, "added": 0}
    finally:
        group.rmdir()
