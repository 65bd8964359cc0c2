"""The `convserve-train` command line, run as users run it: in a subprocess."""

import json
import subprocess
import sys
from pathlib import Path

from service.contract.manifest import load_manifest
from training.__main__ import main

CONSOLE_SCRIPT = Path(sys.executable).parent / "convserve-train"


def run_cli(*args: str | Path, module: bool = False) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "training"] if module else [str(CONSOLE_SCRIPT)]
    return subprocess.run(
        [*command, *map(str, args)], capture_output=True, text=True, timeout=300, check=False
    )


def test_classifier_quick_run_trains_and_publishes(tmp_path: Path) -> None:
    run_dir, repository = tmp_path / "run", tmp_path / "models"
    done = run_cli(
        "classifier",
        "--quick",
        "--seed",
        "1",
        "--run-dir",
        run_dir,
        "--repository",
        repository,
        "--no-progress",
    )
    assert done.returncode == 0, done.stderr
    assert "onnxruntime vs torch max |diff|" in done.stdout

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["seed"] == 1 and metrics["quick"] is True
    assert len(metrics["train_loss"]) == len(metrics["val_accuracy"]) == metrics["epochs"]
    assert metrics["test_accuracy"] >= 0.9
    assert metrics["export"]["version"] == 1 and metrics["export"]["parity_max_abs_diff"] <= 1e-4
    assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run_dir / "checkpoint.pt").stat().st_size > 0

    assert (repository / "lenet5" / "1" / "model.onnx").is_file()
    assert load_manifest(repository / "lenet5").metrics["test_accuracy"] == metrics["test_accuracy"]

    again = run_cli(
        "all", "--missing", "--only", "lenet5", "--quick",
        "--repository", repository, "--runs", tmp_path / "runs", module=True,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert "already published" in again.stdout
    assert sorted(p.name for p in (repository / "lenet5").iterdir()) == ["1", "config.yaml"]
    assert not (tmp_path / "runs").exists()


def test_all_missing_trains_what_is_absent_two_at_a_time(tmp_path: Path) -> None:
    repository = tmp_path / "models"
    argv = ["all", "--missing", "--quick", "--no-progress", "--jobs", "2", "--repository", str(repository)]
    assert main([*argv, "--runs", str(tmp_path / "runs")]) == 0
    assert (repository / "lenet5" / "1" / "model.onnx").is_file()
    assert (tmp_path / "runs" / "lenet5" / "metrics.json").is_file()
    assert (repository / "dcgan" / "1" / "model.onnx").is_file()  # judged by the LeNet-5 trained beside it
    assert load_manifest(repository / "dcgan").kind == "generator"
    scenes = load_manifest(repository / "scenes-resnet")
    assert scenes.kind == "classifier" and scenes.input.color_mode == "RGB" and len(scenes.labels) == 12
    assert load_manifest(repository / "captioner").kind == "captioner"
    assert (repository / "captioner" / "1" / "decoder.onnx").is_file()
    assert load_manifest(repository / "captioner-butd").captioner.regions == 4


def test_no_export_publishes_nothing(tmp_path: Path) -> None:
    argv = ["classifier", "--quick", "--no-export", "--no-progress", "--epochs", "1"]
    assert main([*argv, "--run-dir", str(tmp_path / "run"), "--repository", str(tmp_path / "models")]) == 0
    assert (tmp_path / "run" / "checkpoint.pt").is_file()
    assert not (tmp_path / "models").exists()
