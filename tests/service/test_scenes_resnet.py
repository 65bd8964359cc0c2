"""scenes-resnet, served by Classify like lenet5: RGB images in, the large object's colour and shape out."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from conftest import RunningServer, start_server
from PIL import Image

from service.client import VisionClient
from training.data.scenes import CLASS_LABELS, load_classification_split


@pytest.fixture(scope="module")
def scenes_server(
    trained_scenes_resnet: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[RunningServer, Path]]:
    server = start_server(trained_scenes_resnet, tmp_path_factory.mktemp("scenes") / "server.log")
    yield server, trained_scenes_resnet
    server.stop()


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image.transpose(1, 2, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_classify_answers_what_the_model_computes_in_process(
    scenes_server: tuple[RunningServer, Path],
) -> None:
    server, repository = scenes_server
    images, _ = load_classification_split("test", 0, 8)
    session = ort.InferenceSession(str(repository / "scenes-resnet" / "1" / "model.onnx"))
    (logits,) = session.run(None, {"image": np.ascontiguousarray(images)})
    with VisionClient(server.target) as client:
        response = client.classify([_png(image) for image in images], model="scenes-resnet", top_k=3)
    assert response.model == "scenes-resnet"
    for result, row in zip(response.results, logits, strict=True):
        assert [p.label for p in result.predictions] == [CLASS_LABELS[i] for i in np.argsort(-row)[:3]]


def test_a_photo_sized_jpeg_is_resized_to_the_model_input(scenes_server: tuple[RunningServer, Path]) -> None:
    server, _ = scenes_server
    images, _ = load_classification_split("test", 0, 1)
    big = Image.fromarray(images[0].transpose(1, 2, 0)).resize((480, 480), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    big.save(buffer, format="JPEG", quality=90)
    with VisionClient(server.target) as client:
        result = client.classify([buffer.getvalue()], model="scenes-resnet", top_k=1).results[0]
    assert result.predictions[0].label in CLASS_LABELS
