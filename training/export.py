"""Checkpoint -> ONNX -> parity check -> atomic publish into the model repository.

A version directory appears in the repository only after its ONNX file has been checked
against torch, so the server never sees a model that disagrees with its training code.
Classifiers (LeNet-5) and generators (the DCGAN) differ in their graphs and parity checks and
share the publishing (`publish`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from service.contract.manifest import (
    DigitAdaptation,
    GeneratorSpec,
    InputSpec,
    Manifest,
    Provenance,
    ResizeAdaptation,
    write_manifest,
)
from service.contract.tensor_names import (
    CLASSIFIER_INPUT,
    CLASSIFIER_OUTPUT,
    GENERATOR_INPUTS,
    GENERATOR_OUTPUT,
)
from training.data.digits import DATA_DESCRIPTION, load_digit_splits
from training.data.scenes import CLASS_LABELS as SCENE_CLASS_LABELS
from training.data.scenes import DATA_DESCRIPTION as SCENES_DESCRIPTION
from training.data.scenes import load_classification_split
from training.export_captioner import CaptionModel, captioner_stage, load_captioner
from training.models.butd import BottomUpTopDown
from training.models.captioner import Captioner
from training.models.dcgan import DCGANConfig, Generator, Uint8Generator
from training.models.lenet import LeNet5, LeNetConfig
from training.models.resnet import ResNet, ResNetConfig

OPSET = 18
MODEL_FILE = "model.onnx"
#: Largest |onnxruntime - torch| allowed on any logit.
PARITY_TOLERANCE = 1e-4
PARITY_BATCHES = (1, 64)
#: Largest |onnxruntime - torch| allowed on a generated pixel, in uint8 levels: float round-off
#: may move a value across a rounding boundary, and nothing more is allowed.
GENERATOR_PARITY_LEVELS = 1


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


def load_checkpoint(path: Path) -> tuple[LeNet5 | ResNet | Generator | CaptionModel, dict]:
    """Rebuild the model a checkpoint describes; returns (model in eval mode, checkpoint dict).

    A "lenet5" checkpoint gives a LeNet5, "scenes-resnet" a ResNet, "dcgan" its Generator,
    "captioner" the Captioner, "captioner-butd" the BottomUpTopDown captioner.
    """
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    kind = checkpoint.get("model")
    if kind == "lenet5":
        model: LeNet5 | ResNet | Generator | CaptionModel = LeNet5(LeNetConfig(**checkpoint["config"]))
    elif kind == "scenes-resnet":
        model = ResNet(ResNetConfig(**checkpoint["config"]))
    elif kind in ("captioner", "captioner-butd"):
        return load_captioner(checkpoint), checkpoint
    elif kind == "dcgan":
        model = Generator(DCGANConfig(**checkpoint["config"]))
    else:
        raise ExportError(f"{path}: no exporter for model {kind!r}")
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
        input_names=[CLASSIFIER_INPUT],
        output_names=[CLASSIFIER_OUTPUT],
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
    if inputs != [CLASSIFIER_INPUT] or outputs != [CLASSIFIER_OUTPUT]:
        raise ExportError(
            f"{path}: expected I/O {[CLASSIFIER_INPUT]} -> {[CLASSIFIER_OUTPUT]}, got {inputs} -> {outputs}"
        )
    tensor_type = graph.input[0].type.tensor_type
    if tensor_type.elem_type != onnx.TensorProto.UINT8:
        raise ExportError(
            f"{path}: input must be uint8, got {onnx.TensorProto.DataType.Name(tensor_type.elem_type)}"
        )
    if not tensor_type.shape.dim[0].dim_param:
        raise ExportError(f"{path}: the batch axis is fixed at {tensor_type.shape.dim[0].dim_value}")


def parity_inputs(channels: int, size: int, real: np.ndarray | None = None) -> list[np.ndarray]:
    """Real test images (digits by default) and random uint8 images, at every size in PARITY_BATCHES."""
    real = load_digit_splits().test.images if real is None else real
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
            (ort_logits,) = session.run([CLASSIFIER_OUTPUT], {CLASSIFIER_INPUT: batch})
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


def build_manifest(checkpoint: dict, config: LeNetConfig | ResNetConfig, parity: float) -> Manifest:
    """A classifier's manifest: what the server needs to adapt inputs, and the labels."""
    if isinstance(config, ResNetConfig):
        return _scenes_manifest(checkpoint, config, parity)
    return Manifest(
        name=checkpoint["model"],
        kind="classifier",
        description="LeNet-5 trained on scikit-learn's handwritten digits",
        input=InputSpec(
            name=CLASSIFIER_INPUT,
            channels=config.in_channels,
            height=config.image_size,
            width=config.image_size,
            color_mode="L",
        ),
        output_name=CLASSIFIER_OUTPUT,
        adaptation=DigitAdaptation(canvas=32, source_size=8, levels=17),
        labels=[str(d) for d in range(config.num_classes)],
        metrics={
            "test_accuracy": float(checkpoint["metrics"]["test_accuracy"]),
            "parity_max_abs_diff": parity,
        },
        provenance=provenance(checkpoint, "train_classifier"),
    )


def _scenes_manifest(checkpoint: dict, config: ResNetConfig, parity: float) -> Manifest:
    """scenes-resnet: RGB images resized to 64x64; labels name the large object's colour and shape."""
    return Manifest(
        name=checkpoint["model"],
        kind="classifier",
        description="residual network naming the colour and shape of the large object in a generated scene",
        input=InputSpec(
            name=CLASSIFIER_INPUT,
            channels=config.in_channels,
            height=config.image_size,
            width=config.image_size,
            color_mode="RGB",
        ),
        output_name=CLASSIFIER_OUTPUT,
        adaptation=ResizeAdaptation(),
        labels=list(SCENE_CLASS_LABELS),
        metrics={
            **{
                name: float(checkpoint["metrics"][name])
                for name in ("test_accuracy", "style_shift_accuracy")
                if name in checkpoint["metrics"]
            },
            "parity_max_abs_diff": parity,
        },
        provenance=provenance(checkpoint, "train_scenes_resnet", SCENES_DESCRIPTION),
    )


def provenance(checkpoint: dict, trainer: str, data: str = DATA_DESCRIPTION) -> Provenance:
    """Seed, data, time, code and torch version of a checkpoint being published."""
    return Provenance(
        seed=int(checkpoint["seed"]),
        data=data,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        git_revision=git_revision(),
        torch_version=torch.__version__,
        trainer=trainer,
    )


def export_checkpoint(
    checkpoint_path: Path,
    repository: Path,
    version: int | None = None,
    tolerance: float | None = None,
) -> ExportResult:
    """Export, verify and publish `<repository>/<name>/<version>/model.onnx` plus config.yaml.

    Classifier, generator or captioner (encoder.onnx and decoder.onnx), as the checkpoint says.
    `version` defaults to one more than the highest published version; `tolerance` to
    PARITY_TOLERANCE (logits, captioner outputs) or GENERATOR_PARITY_LEVELS (uint8 pixels).
    """
    model, checkpoint = load_checkpoint(Path(checkpoint_path))
    if isinstance(model, Captioner | BottomUpTopDown):
        stage = captioner_stage(model, checkpoint, PARITY_TOLERANCE if tolerance is None else tolerance)
    elif isinstance(model, Generator):
        stage = _generator_stage(
            model, checkpoint, GENERATOR_PARITY_LEVELS if tolerance is None else tolerance
        )
    else:
        stage = _classifier_stage(model, checkpoint, PARITY_TOLERANCE if tolerance is None else tolerance)
    return publish(Path(repository) / checkpoint["model"], stage, version)


#: Writes the version's files into the staging directory, verifies them and returns the
#: manifest and the parity figure; raises ExportError when they must not be published.
Stage = Callable[[Path], tuple[Manifest, float]]


def publish(model_dir: Path, stage: Stage, version: int | None = None) -> ExportResult:
    """Stage a version in a hidden directory next to the versions, then rename it into place.

    The rename happens only after `stage` wrote and verified the files, so readers never see a
    partial or unverified version; on any failure the staging directory is removed and the
    repository is left as it was.
    """
    model_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=model_dir))
    try:
        manifest, parity = stage(staging)
        if version is None:
            version = max(published_versions(model_dir), default=0) + 1
        target = model_dir / str(version)
        if target.exists():
            raise ExportError(f"{target} already exists; versions are immutable")
        staging.chmod(0o755)  # mkdtemp creates it private; the server may run as another user
        manifest_path = write_manifest(model_dir, manifest)
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ExportResult(
        name=manifest.name,
        version=version,
        path=target / MODEL_FILE,
        manifest_path=manifest_path,
        parity_max_abs_diff=parity,
    )


def check_parity(name: str, parity: float, tolerance: float, unit: str = "") -> None:
    """Print the parity figure and raise ExportError when it exceeds the tolerance (or is NaN)."""
    print(f"{name}: onnxruntime vs torch max |diff| = {parity:.3g}{unit} (tolerance {tolerance:g}{unit})")
    if not parity <= tolerance:
        raise ExportError(
            f"parity check failed: max |onnxruntime - torch| = {parity:.3g}{unit} > {tolerance:g}"
        )


def _classifier_stage(model: LeNet5 | ResNet, checkpoint: dict, tolerance: float) -> Stage:
    def stage(staging: Path) -> tuple[Manifest, float]:
        config = model.config
        onnx_path = staging / MODEL_FILE
        export_onnx(model, onnx_path, config.in_channels, config.image_size)
        check_graph(onnx_path)
        real = (
            load_classification_split("test", 0, max(PARITY_BATCHES))[0]
            if isinstance(model, ResNet)
            else None
        )
        batches = parity_inputs(config.in_channels, config.image_size, real)
        parity = parity_max_abs_diff(model, onnx_path, batches)
        check_parity(checkpoint["model"], parity, tolerance)
        return build_manifest(checkpoint, config, parity), parity

    return stage


# --- generators ---


def export_generator_onnx(model: Generator, path: Path) -> None:
    """Write `z` (N, latent) float32, `label` (N,) int64 -> `image` (N, C, 32, 32) uint8, N dynamic."""
    c = model.config
    example = (torch.zeros(2, c.latent_size), torch.zeros(2, dtype=torch.int64))
    batch = torch.export.Dim("batch")
    with warnings.catch_warnings():  # torch-internal deprecation noise, nothing a caller can act on
        warnings.filterwarnings(
            "ignore", message=r"`isinstance\(treespec, LeafSpec\)`", category=FutureWarning
        )
        warnings.filterwarnings(
            "ignore", message=r"# The axis name: batch will not be used"
        )  # z, label share it
        torch.onnx.export(
            Uint8Generator(model).eval(),
            example,
            str(path),
            input_names=list(GENERATOR_INPUTS),
            output_names=[GENERATOR_OUTPUT],
            dynamic_shapes={"z": {0: batch}, "label": {0: batch}},
            opset_version=OPSET,
            dynamo=True,
            external_data=False,
            verbose=False,
        )


def check_generator_graph(path: Path) -> None:
    """Valid ONNX: float32 `z`, int64 `label`, both with a dynamic batch axis -> uint8 `image`."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"{path}: invalid ONNX: {e}") from e
    graph = onnx.load(str(path)).graph
    inputs, outputs = [i.name for i in graph.input], [o.name for o in graph.output]
    if inputs != list(GENERATOR_INPUTS) or outputs != [GENERATOR_OUTPUT]:
        raise ExportError(
            f"{path}: expected I/O {list(GENERATOR_INPUTS)} -> {[GENERATOR_OUTPUT]}, "
            f"got {inputs} -> {outputs}"
        )
    expected = {
        "z": onnx.TensorProto.FLOAT,
        "label": onnx.TensorProto.INT64,
        GENERATOR_OUTPUT: onnx.TensorProto.UINT8,
    }
    for value in [*graph.input, *graph.output]:
        tensor_type = value.type.tensor_type
        if tensor_type.elem_type != expected[value.name]:
            want, got = (
                onnx.TensorProto.DataType.Name(t) for t in (expected[value.name], tensor_type.elem_type)
            )
            raise ExportError(f"{path}: {value.name} must be {want}, got {got}")
        if not tensor_type.shape.dim[0].dim_param:
            raise ExportError(
                f"{path}: the batch axis of {value.name} is fixed at {tensor_type.shape.dim[0].dim_value}"
            )


def generator_parity_inputs(latent_size: int, num_classes: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Standard-normal latents (and a few far in the tails) with every label, at each PARITY_BATCHES size."""
    rng = np.random.default_rng(0)
    batches = []
    for n in PARITY_BATCHES:
        z = rng.standard_normal((n, latent_size)).astype(np.float32)
        z[::7] *= 3.0  # the tails, where tanh saturates
        batches.append((z, (np.arange(n) % num_classes).astype(np.int64)))
    return batches


def generator_parity_max_abs_diff(
    model: Generator, path: Path, batches: list[tuple[np.ndarray, np.ndarray]]
) -> float:
    """Largest |onnxruntime - torch| over all uint8 pixels of all batches, in grey levels."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    wrapped = Uint8Generator(model).eval()
    worst = 0.0
    with torch.no_grad():
        for z, label in batches:
            (ort_image,) = session.run([GENERATOR_OUTPUT], {"z": z, "label": label})
            torch_image = wrapped(torch.tensor(z), torch.tensor(label)).numpy()
            if ort_image.shape != torch_image.shape or ort_image.dtype != np.uint8:
                raise ExportError(
                    f"onnxruntime returned {ort_image.dtype} {ort_image.shape}, "
                    f"torch uint8 {torch_image.shape}"
                )
            worst = max(
                worst, float(np.max(np.abs(ort_image.astype(np.int16) - torch_image.astype(np.int16))))
            )
    return worst


def build_generator_manifest(checkpoint: dict, config: DCGANConfig, parity: float) -> Manifest:
    """The manifest of the digit DCGAN: its inputs, output, classes, quality and which epoch shipped."""
    metrics = {key: float(value) for key, value in checkpoint["metrics"].items()}
    return Manifest(
        name=checkpoint["model"],
        kind="generator",
        description=(
            "label-conditional DCGAN trained on scikit-learn's handwritten digits; "
            + checkpoint.get("selection", "")
        ).strip("; "),
        output_name=GENERATOR_OUTPUT,
        generator=GeneratorSpec(
            latent_input=GENERATOR_INPUTS[0],
            label_input=GENERATOR_INPUTS[1],
            latent_size=config.latent_size,
            output=GENERATOR_OUTPUT,
            channels=config.channels,
            height=config.image_size,
            width=config.image_size,
        ),
        labels=[str(d) for d in range(config.num_classes)],
        metrics={**metrics, "parity_max_abs_diff": parity},
        provenance=provenance(checkpoint, "train_gan"),
    )


def _generator_stage(model: Generator, checkpoint: dict, tolerance: float) -> Stage:
    def stage(staging: Path) -> tuple[Manifest, float]:
        config = model.config
        onnx_path = staging / MODEL_FILE
        export_generator_onnx(model, onnx_path)
        check_generator_graph(onnx_path)
        batches = generator_parity_inputs(config.latent_size, config.num_classes)
        parity = generator_parity_max_abs_diff(model, onnx_path, batches)
        check_parity(checkpoint["model"], parity, tolerance, unit=" levels")
        return build_generator_manifest(checkpoint, config, parity), parity

    return stage
