"""The DCGAN: shapes, conditioning, the quality metrics, export parity and a quick CLI run."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from service.contract.manifest import load_manifest
from service.contract.tensor_names import GENERATOR_INPUTS, GENERATOR_OUTPUT
from training.evaluate import (
    diversity_ratio,
    frechet_distance,
    mean_nearest_distance,
    mean_within_class_distance,
    memorisation_ratio,
)
from training.export import export_checkpoint, load_checkpoint
from training.models.dcgan import DCGANConfig, Discriminator, Generator, Uint8Generator, to_uint8

CONSOLE_SCRIPT = Path(sys.executable).parent / "convserve-train"
SMALL = DCGANConfig(g_width=8, d_width=8)
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def generator() -> Generator:
    torch.manual_seed(0)
    return Generator(SMALL).eval()


def test_generator_and_discriminator_shapes(generator: Generator) -> None:
    z, label = torch.randn(5, SMALL.latent_size), torch.arange(5)
    images = generator(z, label)
    assert images.shape == (5, 1, 32, 32) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1
    pixels = Uint8Generator(generator)(z, label)
    assert pixels.shape == (5, 1, 32, 32) and pixels.dtype == torch.uint8
    assert Discriminator(SMALL)(images, label).shape == (5,)


def test_to_uint8_maps_the_tanh_range_onto_0_255() -> None:
    t = torch.tensor([-1.5, -1.0, 0.0, 1.0, 2.0])
    assert to_uint8(t).tolist() == [0, 0, 128, 255, 255]


def test_the_label_changes_the_output(generator: Generator) -> None:
    z = torch.randn(1, SMALL.latent_size).repeat(10, 1)
    images = generator(z, torch.arange(10))
    assert all(not torch.allclose(images[0], images[i]) for i in range(1, 10))


def test_weights_follow_the_dcgan_initialisation() -> None:
    torch.manual_seed(0)
    weights = Generator(DCGANConfig()).net[0].weight.detach()
    assert abs(float(weights.std()) - 0.02) < 0.002 and abs(float(weights.mean())) < 0.002


def test_diversity_of_identical_images_is_zero() -> None:
    images = np.full((6, 1, 32, 32), 200, dtype=np.uint8)
    labels = np.array([0, 0, 0, 1, 1, 1])
    assert mean_within_class_distance(images, labels) == 0.0
    varied = np.random.default_rng(0).integers(0, 256, (6, 1, 32, 32), dtype=np.uint8)
    assert diversity_ratio(images, labels, varied, labels) == 0.0


def test_within_class_distance_of_two_images() -> None:
    images = np.zeros((2, 1, 2, 2), dtype=np.uint8)
    images[1] = 255  # four pixels differ by 1.0: distance 2
    assert mean_within_class_distance(images, np.array([3, 3])) == pytest.approx(2.0)


def test_frechet_distance_of_a_set_with_itself_is_zero() -> None:
    features = np.random.default_rng(0).normal(size=(300, 8))
    assert frechet_distance(features, features) == pytest.approx(0.0, abs=1e-8)
    shifted = features + 1.0  # the means differ by 1 in each of 8 dimensions, covariances agree
    assert frechet_distance(features, shifted) == pytest.approx(8.0, rel=1e-6)


def test_memorisation_distance_of_training_images_to_themselves_is_zero() -> None:
    rng = np.random.default_rng(0)
    train, heldout = (rng.integers(0, 256, (20, 1, 8, 8), dtype=np.uint8) for _ in range(2))
    assert mean_nearest_distance(train, train) == 0.0
    assert memorisation_ratio(train[:5], train, heldout) == 0.0
    assert memorisation_ratio(heldout, train, heldout) == pytest.approx(1.0)


def test_export_parity(generator: Generator, tmp_path: Path) -> None:
    checkpoint = tmp_path / "checkpoint.pt"
    torch.save(
        {
            "model": "dcgan",
            "config": SMALL.__dict__,
            "state_dict": generator.state_dict(),
            "seed": 0,
            "metrics": {"label_accuracy": 0.5},
        },
        checkpoint,
    )
    result = export_checkpoint(checkpoint, tmp_path / "models")
    assert result.parity_max_abs_diff <= 1
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    # the graph's names are the contract's, and so are the manifest's
    assert tuple(i.name for i in session.get_inputs()) == GENERATOR_INPUTS
    assert [o.name for o in session.get_outputs()] == [GENERATOR_OUTPUT]
    spec = load_manifest(tmp_path / "models" / "dcgan").generator
    assert (spec.latent_input, spec.label_input, spec.output) == (*GENERATOR_INPUTS, GENERATOR_OUTPUT)
    model, _ = load_checkpoint(checkpoint)
    for batch in (1, 64):
        z = np.random.default_rng(batch).standard_normal((batch, SMALL.latent_size)).astype(np.float32)
        label = (np.arange(batch) % 10).astype(np.int64)
        (image,) = session.run(["image"], {"z": z, "label": label})
        with torch.no_grad():
            expected = Uint8Generator(model)(torch.tensor(z), torch.tensor(label)).numpy()
        assert image.dtype == np.uint8 and image.shape == (batch, 1, 32, 32)
        assert np.max(np.abs(image.astype(np.int16) - expected)) <= 1


def test_quick_run_publishes_a_generator(tmp_path: Path) -> None:
    run_dir, repository = tmp_path / "run", tmp_path / "models"
    argv = ["gan", "--quick", "--no-progress", "--run-dir", run_dir, "--repository", repository]
    done = subprocess.run(
        [str(CONSOLE_SCRIPT), *map(str, argv)], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    assert (repository / "dcgan" / "1" / "model.onnx").is_file()
    manifest = load_manifest(repository / "dcgan")
    assert manifest.kind == "generator" and manifest.labels == [str(d) for d in range(10)]
    spec = manifest.generator
    assert (spec.latent_input, spec.label_input, spec.output) == ("z", "label", "image")
    assert (spec.latent_size, spec.channels, spec.height, spec.width) == (64, 1, 32, 32)
    assert manifest.metrics["parity_max_abs_diff"] <= 1
    assert manifest.provenance is not None and manifest.provenance.trainer == "train_gan"

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert len(metrics["d_loss"]) == metrics["epochs"] == 2
    assert metrics["selected_epoch"] in [e["epoch"] for e in metrics["evaluations"]]
    assert manifest.metrics["selected_epoch"] == metrics["selected_epoch"]
    assert f"epoch {metrics['selected_epoch']}" in manifest.description
    for key in (
        "label_accuracy",
        "mean_confidence",
        "diversity_ratio",
        "fid",
        "fid_floor",
        "memorisation_ratio",
    ):
        assert manifest.metrics[key] == pytest.approx(metrics[key])
    assert (run_dir / "losses.png").read_bytes()[:8] == PNG
    assert (run_dir / "samples" / "epoch_0002.png").read_bytes()[:8] == PNG
    assert (run_dir / "samples_selected.png").read_bytes()[:8] == PNG
