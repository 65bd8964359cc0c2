"""Checkpoint -> ONNX -> parity check -> atomic publish into the model repository.

A version directory appears in the repository only after its ONNX file has been checked
against torch, so the server never sees a model that disagrees with its training code.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from service.manifest import DigitAdaptation, InputSpec, Manifest, Provenance, write_manifest
from training.data.digits import DATA_DESCRIPTION, load_digit_splits
from training.models.lenet import LeNet5, LeNetConfig

OPSET = 18
MODEL_FILE = "model.onnx"
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
#: Largest |onnxruntime - torch| allowed on any logit.
PARITY_TOLERANCE = 1e-4
PARITY_BATCHES = (1, 64)


class ExportError(RuntimeError):
    """The exported graph is invalid or disagrees with torch; nothing was published."""


@dataclass(frozen=True)
class ExportResult:
    name: str
    version: int
    path: Path  # the published model.onnx
    manifest_path: Path
    parity_max_abs_diff: float

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "version": self.version,
            "path": str(self.path),
            "manifest_path": str(self.manifest_path),
            "parity_max_abs_diff": self.parity_max_abs_diff,
        }


def load_checkpoint(path: Path) -> tuple[LeNet5, dict]:
    """Rebuild the model a checkpoint describes; returns (model in eval mode, checkpoint dict)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if checkpoint.get("model") != "lenet5":
        raise ExportError(f"{path}: no exporter for model {checkpoint.get('model')!r}")
    model = LeNet5(LeNetConfig(**checkpoint["config"]))
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval(), checkpoint


def export_onnx(model: nn.Module, path: Path, channels: int, size: int) -> None:
    """Write a single-file ONNX graph: uint8 `image` (N, C, H, W) -> `logits`, N dynamic."""
    example = torch.zeros(2, channels, size, size, dtype=torch.uint8)
    with warnings.catch_warnings():  # torch-internal deprecation noise, nothing a caller can act on
        warnings.filterwarnings(
            "ignore", message=r"`isinstance\(treespec, LeafSpec\)`", category=FutureWarning
        )
        _export(model, example, path)


def _export(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    torch.onnx.export(
        model.eval(),
        (example,),
        str(path),
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
        opset_version=OPSET,
        dynamo=True,
        external_data=False,
        verbose=False,
    )


def check_graph(path: Path) -> None:
    """The file is valid ONNX with the named uint8 input, a dynamic batch axis and `logits`."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"{path}: invalid ONNX: {e}") from e
    graph = onnx.load(str(path)).graph
    inputs, outputs = [i.name for i in graph.input], [o.name for o in graph.output]
    if inputs != [INPUT_NAME] or outputs != [OUTPUT_NAME]:
        raise ExportError(
            f"{path}: expected I/O {[INPUT_NAME]} -> {[OUTPUT_NAME]}, got {inputs} -> {outputs}"
        )
    tensor_type = graph.input[0].type.tensor_type
    if tensor_type.elem_type != onnx.TensorProto.UINT8:
        raise ExportError(
            f"{path}: input must be uint8, got {onnx.TensorProto.DataType.Name(tensor_type.elem_type)}"
        )
    if not tensor_type.shape.dim[0].dim_param:
        raise ExportError(f"{path}: the batch axis is fixed at {tensor_type.shape.dim[0].dim_value}")


def parity_inputs(channels: int, size: int) -> list[np.ndarray]:
    """Real test digits and random uint8 images, at every batch size in PARITY_BATCHES."""
    real = load_digit_splits().test.images
    noise = np.random.default_rng(0).integers(
        0, 256, (max(PARITY_BATCHES), channels, size, size), dtype=np.uint8
    )
    batches = []
    for n in PARITY_BATCHES:
        if real.shape[1:] == (channels, size, size):
            batches.append(np.ascontiguousarray(real[:n]))
        batches.append(noise[:n])
    return batches


def parity_max_abs_diff(model: nn.Module, path: Path, batches: list[np.ndarray]) -> float:
    """Largest |onnxruntime - torch| over all logits of all batches (NaN counts as a mismatch)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    with torch.no_grad():
        for batch in batches:
            (ort_logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: batch})
            torch_logits = model.eval()(torch.tensor(batch)).numpy()
            if ort_logits.shape != torch_logits.shape:
                raise ExportError(f"onnxruntime returned {ort_logits.shape}, torch {torch_logits.shape}")
            diff = float(np.max(np.abs(ort_logits.astype(np.float64) - torch_logits)))
            worst = diff if np.isnan(diff) else max(worst, diff)
            if np.isnan(worst):
                break
    return worst


def published_versions(model_dir: Path) -> list[int]:
    """Integer version directories, ascending; hidden staging directories are not versions."""
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def git_revision() -> str:
    """Short revision of the checkout this code runs from, or "unknown"."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def build_manifest(checkpoint: dict, config: LeNetConfig, parity: float) -> Manifest:
    """The manifest of a LeNet-5 trained on the digits: what the server needs to adapt inputs."""
    return Manifest(
        name=checkpoint["model"],
        kind="classifier",
        description="LeNet-5 trained on scikit-learn's handwritten digits",
        input=InputSpec(
            name=INPUT_NAME,
            channels=config.in_channels,
            height=config.image_size,
            width=config.image_size,
            color_mode="L",
        ),
        output_name=OUTPUT_NAME,
        adaptation=DigitAdaptation(canvas=32, source_size=8, levels=17),
        labels=[str(d) for d in range(config.num_classes)],
        metrics={
            "test_accuracy": float(checkpoint["metrics"]["test_accuracy"]),
            "parity_max_abs_diff": parity,
        },
        provenance=Provenance(
            seed=int(checkpoint["seed"]),
            data=DATA_DESCRIPTION,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            git_revision=git_revision(),
            torch_version=torch.__version__,
            trainer="train_classifier",
        ),
    )


def export_checkpoint(
    checkpoint_path: Path,
    repository: Path,
    version: int | None = None,
    tolerance: float = PARITY_TOLERANCE,
) -> ExportResult:
    """Export, verify and publish `<repository>/<name>/<version>/model.onnx` plus config.yaml.

    The ONNX file is written into a hidden staging directory next to the versions and renamed
    to the version number only after it passed the checks, so readers never see a partial
    version. `version` defaults to one more than the highest published version.
    """
    model, checkpoint = load_checkpoint(Path(checkpoint_path))
    config = model.config
    model_dir = Path(repository) / checkpoint["model"]
    model_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=model_dir))
    try:
        onnx_path = staging / MODEL_FILE
        export_onnx(model, onnx_path, config.in_channels, config.image_size)
        check_graph(onnx_path)
        parity = parity_max_abs_diff(model, onnx_path, parity_inputs(config.in_channels, config.image_size))
        print(
            f"{checkpoint['model']}: onnxruntime vs torch max |diff| = {parity:.3g} (tolerance {tolerance:g})"
        )
        if not parity <= tolerance:
            raise ExportError(
                f"parity check failed: max |onnxruntime - torch| = {parity:.3g} > {tolerance:g}"
            )
        if version is None:
            version = max(published_versions(model_dir), default=0) + 1
        target = model_dir / str(version)
        if target.exists():
            raise ExportError(f"{target} already exists; versions are immutable")
        staging.chmod(0o755)  # mkdtemp creates it private; the server may run as another user
        manifest_path = write_manifest(model_dir, build_manifest(checkpoint, config, parity))
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ExportResult(
        name=checkpoint["model"],
        version=version,
        path=target / MODEL_FILE,
        manifest_path=manifest_path,
        parity_max_abs_diff=parity,
    )
