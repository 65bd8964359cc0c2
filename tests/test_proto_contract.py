"""The wire contract of protos/ does not break: `buf breaking` against a baseline commit.

Baseline (the first that exists): $CONVSERVE_PROTO_BASELINE (any git ref); the merge-base with
origin/main when HEAD is not on it (a branch or pull request: every change it brings is
checked); HEAD~1 (on main, and in CI where HEAD is the submitted commit: that commit's changes,
plus any uncommitted ones); HEAD itself (a one-commit shallow clone: only uncommitted changes
can be checked; CI should fetch at least two commits). The protos of the baseline come from
`git archive`, never from the working tree, so the check means the same locally and in CI.

Rules: buf's FILE category (its default and strictest): besides the wire (field numbers and
types, removed fields, messages, enums values, services and RPCs) it covers names (the JSON
mapping, grpcurl, the HTTP API) and files and packages (the generated Python modules clients
import). An intentional break needs a new package version (convserve.v2), not a silenced check.

buf comes from npm (@bufbuild/buf, pinned) into build/buf, which is git-ignored; `make
proto-check` runs this file.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from io import BytesIO
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BUF_VERSION = "1.75.0"
BUF_DIR = ROOT / "build" / "buf"
BUF = BUF_DIR / "node_modules" / ".bin" / "buf"


@pytest.fixture(scope="module")
def buf() -> Path:
    if not BUF.exists() or _buf_version(BUF) != BUF_VERSION:
        npm = shutil.which("npm")
        if npm is None:
            pytest.fail("npm is not installed: it installs buf for the proto contract check (Node.js's npm)")
        BUF_DIR.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                npm,
                "install",
                "--no-save",
                "--no-audit",
                "--no-fund",
                "--prefix",
                str(BUF_DIR),
                f"@bufbuild/buf@{BUF_VERSION}",
            ],
            check=True,
            capture_output=True,
            timeout=300,
        )
    assert _buf_version(BUF) == BUF_VERSION
    return BUF


def _buf_version(buf: Path) -> str:
    try:
        return subprocess.run([buf, "--version"], capture_output=True, text=True, timeout=60).stdout.strip()
    except OSError:
        return ""


def _git(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)


def _exists(ref: str) -> bool:
    return _git("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}").returncode == 0


def baseline_ref() -> str:
    if ref := os.environ.get("CONVSERVE_PROTO_BASELINE"):
        assert _exists(ref), f"CONVSERVE_PROTO_BASELINE={ref} is not a commit here"
        return ref
    head = _git("rev-parse", "HEAD").stdout.strip()
    if _exists("origin/main"):
        base = _git("merge-base", "HEAD", "origin/main").stdout.strip()
        if base and base != head:
            return base
    return "HEAD~1" if _exists("HEAD~1") else "HEAD"


def _protos_at(ref: str, dest: Path) -> Path:
    archive = subprocess.run(
        ["git", "archive", "--format=tar", ref, "protos"], cwd=ROOT, capture_output=True, timeout=60
    )
    dest.mkdir(parents=True)
    if archive.returncode != 0:  # the baseline has no protos yet: nothing can break
        return dest
    with tarfile.open(fileobj=BytesIO(archive.stdout)) as tar:
        tar.extractall(dest, filter="data")
    return dest / "protos"


def _breaking(buf: Path, current: Path, against: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [buf, "breaking", str(current), "--against", str(against), "--error-format", "text"],
        capture_output=True,
        text=True,
        timeout=120,
    )


def _copy_protos(dest: Path) -> Path:
    shutil.copytree(ROOT / "protos", dest)
    return dest


def test_protos_have_no_breaking_change_against_the_baseline(buf: Path, tmp_path: Path) -> None:
    if _git("rev-parse", "HEAD").returncode != 0:
        pytest.skip("not a git checkout: no baseline to compare with")
    ref = baseline_ref()
    against = _protos_at(ref, tmp_path / "baseline")
    if not any(against.rglob("*.proto")):
        pytest.skip(f"the baseline {ref} has no protos")
    done = _breaking(buf, _copy_protos(tmp_path / "current"), against)
    assert done.returncode == 0, f"breaking changes against {ref}:\n{done.stdout}{done.stderr}"


MUTATIONS = {
    "renumber a field": (
        "convserve/v1/vision.proto", "optional int32 top_k = 4;", "optional int32 top_k = 9;", "top_k",
    ),
    "remove a field": ("convserve/v1/vision.proto", "  optional uint64 seed = 5;\n", "", "deleted"),
    "change a field's type": (
        "convserve/v1/vision.proto",
        "bytes data = 1;\n  uint32 height = 2;",
        "bytes data = 1;\n  int64 height = 2;",
        "type",
    ),
    "remove an RPC": (
        "convserve/v1/vision.proto",
        "  rpc ListModels(ListModelsRequest) returns (ListModelsResponse);\n",
        "",
        "ListModels",
    ),
    "rename a KServe field": (
        "inference/grpc_predict_v2.proto", "repeated bytes raw_input_contents = 7;",
        "repeated bytes raw_inputs = 7;", "raw_input",
    ),
}  # fmt: skip


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_the_check_fails_on_a_breaking_change(buf: Path, tmp_path: Path, mutation: str) -> None:
    path, old, new, reported = MUTATIONS[mutation]
    baseline = _copy_protos(tmp_path / "baseline")
    changed = _copy_protos(tmp_path / "changed")
    text = (changed / path).read_text()
    assert text.count(old) == 1, f"{old!r} is no longer in {path}: update this mutation"
    (changed / path).write_text(text.replace(old, new))
    assert _breaking(buf, baseline, baseline).returncode == 0
    done = _breaking(buf, changed, baseline)
    assert done.returncode != 0
    assert reported in done.stdout + done.stderr
