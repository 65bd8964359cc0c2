"""Export: a quick-trained LeNet-5 goes to ONNX, is checked against torch and published atomically."""

import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from service.contract.manifest import load_manifest
from service.contract.tensor_names import CLASSIFIER_INPUT, CLASSIFIER_OUTPUT
from training import export
from training.data.digits import load_digit_splits
from training.export import ExportError, ExportResult, export_checkpoint, load_checkpoint, published_versions
from training.train_classifier import run


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("run")
    run(seed=0, run_dir=run_dir, repository=None, quick=True, progress=False)
    return run_dir / "checkpoint.pt"


@pytest.fixture(scope="module")
def published(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[ExportResult]]:
    repository = tmp_path_factory.mktemp("models")
    results = [export_checkpoint(checkpoint, repository) for _ in range(2)]
    return repository, results


@pytest.fixture
def repository_copy(published: tuple[Path, list[ExportResult]], tmp_path: Path) -> Path:
    """A private copy of the published repository, for tests that add to it."""
    copy = tmp_path / "models"
    shutil.copytree(published[0], copy)
    return copy


def hidden_entries(model_dir: Path) -> list[str]:
    return [p.name for p in model_dir.iterdir() if p.name.startswith(".")]


def test_versions_are_published_one_after_another(published: tuple[Path, list[ExportResult]]) -> None:
    repository, results = published
    model_dir = repository / "lenet5"
    assert [r.version for r in results] == [1, 2]
    assert published_versions(model_dir) == [1, 2]
    for r in results:
        assert r.path == model_dir / str(r.version) / "model.onnx" and r.path.is_file()
    assert hidden_entries(model_dir) == [], "no staging directory or temporary file may stay behind"


def test_graph_has_named_uint8_input_and_dynamic_batch(published: tuple[Path, list[ExportResult]]) -> None:
    path = published[1][-1].path
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    (image,) = model.graph.input
    assert image.name == "image"
    assert image.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = image.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [1, 32, 32]
    assert [o.name for o in model.graph.output] == ["logits"]


def test_graph_and_manifest_use_the_contract_names(
    published: tuple[Path, list[ExportResult]],
) -> None:
    repository, results = published
    session = ort.InferenceSession(str(results[-1].path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == [CLASSIFIER_INPUT]
    assert [o.name for o in session.get_outputs()] == [CLASSIFIER_OUTPUT]
    manifest = load_manifest(repository / "lenet5")
    assert (manifest.input.name, manifest.output_name) == (CLASSIFIER_INPUT, CLASSIFIER_OUTPUT)


@pytest.mark.parametrize("batch", [1, 64])
@pytest.mark.parametrize("source", ["digits", "random"])
def test_onnxruntime_matches_torch(
    published: tuple[Path, list[ExportResult]], checkpoint: Path, batch: int, source: str
) -> None:
    result = published[1][-1]
    assert result.parity_max_abs_diff <= 1e-4
    if source == "digits":
        images = np.ascontiguousarray(load_digit_splits().test.images[-batch:])
    else:
        images = np.random.default_rng(batch).integers(0, 256, (batch, 1, 32, 32), dtype=np.uint8)
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    (ort_logits,) = session.run(["logits"], {"image": images})
    model, _ = load_checkpoint(checkpoint)
    with torch.no_grad():
        torch_logits = model(torch.tensor(images)).numpy()
    assert ort_logits.shape == (batch, 10)
    assert np.max(np.abs(ort_logits - torch_logits)) <= 1e-4


def test_manifest_describes_the_latest_version(
    published: tuple[Path, list[ExportResult]], checkpoint: Path
) -> None:
    repository, results = published
    manifest = load_manifest(repository / "lenet5")
    _, ckpt = load_checkpoint(checkpoint)
    assert manifest.name == "lenet5" and manifest.kind == "classifier"
    assert (manifest.input.name, manifest.input.channels, manifest.input.height) == ("image", 1, 32)
    assert manifest.input.color_mode == "L" and manifest.output_name == "logits"
    assert manifest.labels == [str(d) for d in range(10)]
    assert manifest.adaptation.kind == "digits"
    assert manifest.metrics["test_accuracy"] == pytest.approx(ckpt["metrics"]["test_accuracy"])
    assert manifest.metrics["test_accuracy"] >= 0.9
    assert manifest.metrics["parity_max_abs_diff"] == pytest.approx(results[-1].parity_max_abs_diff)
    provenance = manifest.provenance
    assert provenance is not None
    assert provenance.seed == 0 and provenance.trainer == "train_classifier"
    assert "load_digits" in provenance.data and provenance.torch_version == torch.__version__
    assert provenance.created.endswith("+00:00") and provenance.git_revision


def test_explicit_version_and_versions_are_immutable(repository_copy: Path, checkpoint: Path) -> None:
    model_dir = repository_copy / "lenet5"
    with pytest.raises(ExportError, match="already exists"):
        export_checkpoint(checkpoint, repository_copy, version=2)
    assert export_checkpoint(checkpoint, repository_copy, version=7).version == 7
    assert published_versions(model_dir) == [1, 2, 7]
    assert hidden_entries(model_dir) == []


def test_failed_parity_publishes_nothing(
    repository_copy: Path, checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exporter that gets one weight wrong must be caught, and the repository left untouched."""
    real_export_onnx = export.export_onnx

    def export_with_a_wrong_bias(model: torch.nn.Module, path: Path, channels: int, size: int) -> None:
        real_export_onnx(model, path, channels, size)
        proto = onnx.load(str(path))
        (bias,) = [t for t in proto.graph.initializer if t.name.endswith("fc3.bias")]
        bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + np.float32(1e-2), bias.name))
        onnx.save(proto, str(path))

    model_dir = repository_copy / "lenet5"
    manifest_before = (model_dir / "config.yaml").read_bytes()
    monkeypatch.setattr(export, "export_onnx", export_with_a_wrong_bias)
    with pytest.raises(ExportError, match="parity check failed"):
        export_checkpoint(checkpoint, repository_copy)
    assert published_versions(model_dir) == [1, 2]
    assert hidden_entries(model_dir) == []
    assert (model_dir / "config.yaml").read_bytes() == manifest_before


def test_check_graph_rejects_a_fixed_batch(
    published: tuple[Path, list[ExportResult]], tmp_path: Path
) -> None:
    proto = onnx.load(str(published[1][0].path))
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 64
    fixed = tmp_path / "fixed.onnx"
    onnx.save(proto, str(fixed))
    with pytest.raises(ExportError, match="batch axis is fixed"):
        export.check_graph(fixed)
