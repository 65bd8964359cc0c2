"""The layout at run time: the server loads no bench, trainer or torch, `convserve bench` hands over to
`convserve-bench`, and what the server image installs holds no bench, training or tests code.

(`make lint` checks the import rules statically; these check what really happens.)
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "deploy" / "docker" / "Dockerfile"
NOT_IN_THE_SERVER = ("bench", "training", "tests")
#: The Dockerfile stage that installs convserve itself into the server image (`pip install /src`).
SERVER_STAGE = "runtime"


def python(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)


def test_the_server_loads_no_bench_trainer_or_torch() -> None:
    loaded = python(
        "-c",
        "import sys, service.cli, service.server; "
        "print(sorted({name.split('.')[0] for name in sys.modules} & {'bench', 'training', 'torch'}))",
    )
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip() == "[]"


def test_convserve_bench_hands_its_arguments_to_convserve_bench() -> None:
    # bench's own check of its flags answers, so the arguments reached it.
    result = python("-m", "service", "bench", "--duration", "0")
    assert result.returncode == 1
    assert "--duration must be > 0" in result.stderr
    assert "convserve-bench" in python("-m", "service", "bench", "--help").stdout


def server_stage_sources(tmp_path: Path) -> Path:
    """The files the Dockerfile's server stage copies to /src, laid out the same way under tmp_path."""
    stage, lines = None, DOCKERFILE.read_text().splitlines()
    source_root = tmp_path / "src"
    for line in lines:
        words = line.split()
        if words[:1] == ["FROM"]:
            stage = words[-1] if "AS" in words else None
        elif stage == SERVER_STAGE and words[:1] == ["COPY"] and not any(w.startswith("--") for w in words):
            *sources, destination = words[1:]
            assert destination.startswith("/src"), line
            target = source_root / destination.removeprefix("/src").lstrip("/")
            for source in sources:
                place = target / Path(source).name if destination.endswith("/") else target
                place.parent.mkdir(parents=True, exist_ok=True)
                if (REPO / source).is_dir():
                    shutil.copytree(REPO / source, place, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    shutil.copy2(REPO / source, place)
    assert (source_root / "pyproject.toml").is_file(), (
        f"no {SERVER_STAGE} stage copying pyproject.toml to /src"
    )
    return source_root


def test_the_server_image_installs_no_bench_training_or_tests(tmp_path: Path) -> None:
    """Builds the wheel that the image's `pip install /src` installs, from the files its stage copies."""
    source = server_stage_sources(tmp_path)
    wheels = tmp_path / "wheels"
    built = python(
        "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--wheel-dir", str(wheels),
        str(source), timeout=300,
    )  # fmt: skip
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = wheels.glob("convserve-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        top_level = {name.split("/")[0] for name in archive.namelist()}
    assert "service" in top_level
    assert not top_level & set(NOT_IN_THE_SERVER), sorted(top_level)
