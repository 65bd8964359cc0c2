"""Classify over gRPC against a real server and a real onnxruntime session."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import grpc
import numpy as np
import pytest
from drawing import draw_digit, jpeg_bytes, photo_like, png_bytes
from PIL import Image

from service.client import VisionClient
from service.contract.manifest import load_manifest
from training.data.digits import load_digit_splits


def test_held_out_accuracy_matches_the_trainer(client: VisionClient, trained_lenet) -> None:
    """The server's pre-processing reproduces the training path exactly: same accuracy, to the image."""
    test = load_digit_splits().test
    response = client.classify(list(test.native), top_k=1)
    predicted = np.array([r.predictions[0].index for r in response.results])
    accuracy = float((predicted == test.labels).mean())
    recorded = load_manifest(trained_lenet / "lenet5").metrics["test_accuracy"]
    assert accuracy == pytest.approx(recorded, abs=1e-9)
    assert accuracy >= 0.985


@pytest.mark.parametrize("size, pen", [(96, 6), (240, 14), (600, 40)])
def test_drawn_digits_dark_on_light_any_size(client: VisionClient, size: int, pen: int) -> None:
    """Digits that scikit-learn never saw: pen drawings, dark ink on light paper, large."""
    images = [png_bytes(draw_digit(d, size=size, pen=pen)) for d in "0123456789"]
    response = client.classify(images, top_k=1)
    predicted = "".join(r.predictions[0].label for r in response.results)
    assert predicted == "0123456789"


def test_several_images_answer_in_request_order(client: VisionClient) -> None:
    three, seven = png_bytes(draw_digit("3")), png_bytes(draw_digit("7"))
    forward = client.classify([three, seven, three], top_k=1)
    backward = client.classify([seven, three], top_k=1)
    assert [r.predictions[0].label for r in forward.results] == ["3", "7", "3"]
    assert [r.predictions[0].label for r in backward.results] == ["7", "3"]


def test_response_names_the_model_and_ranks_probabilities(client: VisionClient) -> None:
    response = client.classify([png_bytes(draw_digit("4"))], top_k=10)
    assert (response.model, response.version) == ("lenet5", "1")
    scores = [p.score for p in response.results[0].predictions]
    assert len(scores) == 10
    assert scores == sorted(scores, reverse=True)
    assert sum(scores) == pytest.approx(1.0, abs=1e-4)
    assert sorted(p.index for p in response.results[0].predictions) == list(range(10))


def test_top_k_defaults_to_three_and_is_capped_at_the_classes(client: VisionClient) -> None:
    image = png_bytes(draw_digit("2"))
    assert len(client.classify([image]).results[0].predictions) == 3
    assert len(client.classify([image], top_k=50).results[0].predictions) == 10


def test_raw_arrays_grey_rgb_and_rgba(client: VisionClient) -> None:
    grey = np.asarray(draw_digit("5"))
    rgb = np.stack([grey] * 3, axis=-1)
    rgba = np.concatenate([rgb, np.full((*grey.shape, 1), 255, np.uint8)], axis=-1)
    response = client.classify([grey, rgb, rgba, grey[:, :, None]], top_k=1)
    assert [r.predictions[0].label for r in response.results] == ["5"] * 4


@pytest.mark.parametrize("fmt", ["JPEG", "BMP"])
def test_jpeg_and_bmp(client: VisionClient, fmt: str) -> None:
    buffer = io.BytesIO()
    draw_digit("8").convert("RGB").save(buffer, format=fmt)
    assert client.classify([buffer.getvalue()], top_k=1).results[0].predictions[0].label == "8"


def test_explicit_version_and_request_id(server) -> None:
    channel = grpc.insecure_channel(server.target)
    from service._proto.convserve.v1 import vision_pb2 as pb
    from service._proto.convserve.v1 import vision_pb2_grpc as pb_grpc

    stub = pb_grpc.VisionStub(channel)
    request = pb.ClassifyRequest(
        model="lenet5", version="1", images=[pb.Image(encoded=png_bytes(draw_digit("1")))]
    )
    response, call = stub.Classify.with_call(request, metadata=[("x-request-id", "abc-123")], timeout=10)
    assert response.version == "1"
    assert ("x-request-id", "abc-123") in call.trailing_metadata()
    channel.close()


def test_async_client_concurrent_calls(server) -> None:
    from service.client import AsyncVisionClient

    async def main() -> list[str]:
        async with AsyncVisionClient(server.target) as client:
            assert await client.health() == "SERVING"
            calls = [client.classify([png_bytes(draw_digit(d))], top_k=1) for d in "0123456789"]
            return [r.results[0].predictions[0].label for r in await asyncio.gather(*calls)]

    assert asyncio.run(main()) == list("0123456789")


def test_transparent_png_is_read_as_ink_on_paper(client: VisionClient) -> None:
    grey = np.asarray(draw_digit("7"))
    rgba = np.zeros((*grey.shape, 4), np.uint8)
    rgba[..., 3] = 255 - grey  # ink opaque black, paper transparent
    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, format="PNG")
    assert client.classify([buffer.getvalue()], top_k=1).results[0].predictions[0].label == "7"


@pytest.mark.parametrize("seed", [0, 1])
def test_photo_like_jpegs(client: VisionClient, seed: int) -> None:
    """Photos of digits on paper: uneven light, tinted, pencil grey, blurred, noisy, JPEG."""
    images = [jpeg_bytes(photo_like(d, seed=seed)) for d in "0123456789"]
    predicted = "".join(r.predictions[0].label for r in client.classify(images, top_k=1).results)
    assert predicted == "0123456789"


def test_example_images_in_the_readme(client: VisionClient) -> None:
    examples = Path(__file__).resolve().parents[2] / "examples"
    response = client.classify([examples / "digit-7.jpg", examples / "digit-3.jpg"], top_k=1)
    assert [r.predictions[0].label for r in response.results] == ["7", "3"]
