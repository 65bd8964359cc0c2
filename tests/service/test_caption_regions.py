"""captioner-butd through a real server: a captioner that attends over regions is served like the
grid captioner (the torch reference's captions, step batching, KServe v2, HTTP, the CLI), and its
answers carry the regions, with attention over them and an attention picture that draws them as boxes."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import RunningServer, start_server
from PIL import Image

from service._proto.inference import grpc_predict_v2_pb2 as kserve_pb
from service._proto.inference import grpc_predict_v2_pb2_grpc as kserve_grpc
from service.client import AsyncVisionClient, VisionClient
from service.codecs.tensors import decode_output, encode_bytes

MODEL = "captioner-butd"


@pytest.fixture(scope="module")
def butd(
    trained_butd: tuple[Path, dict], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[RunningServer, Path]]:
    """A server on the session's quick captioner-butd."""
    root, _ = trained_butd
    server = start_server(root / "models", tmp_path_factory.mktemp("butd-server") / "server.log")
    yield server, root
    server.stop()


@pytest.fixture(scope="module")
def scenes() -> np.ndarray:
    from training.data.scenes import load_scene_split

    return load_scene_split("test", 0, 4).images


def _png(scene: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(scene.transpose(1, 2, 0))).save(buffer, format="PNG")
    return buffer.getvalue()


def test_captions_match_torch_and_carry_regions_and_attention_over_them(
    butd: tuple[RunningServer, Path], scenes: np.ndarray
) -> None:
    import torch

    from training.caption_decoding import beam_search
    from training.export_captioner import load_captioner

    server, root = butd
    model = load_captioner(torch.load(root / "run" / "checkpoint.pt", weights_only=False))
    with VisionClient(server.target) as client:
        for beam in (1, 3):
            response = client.caption(
                [_png(s) for s in scenes], model=MODEL, beam_size=beam, count=beam, attention=True
            )
            for scene, result in zip(scenes, response.results, strict=True):
                reference = beam_search(model, torch.tensor(scene), beam)
                assert [tuple(c.tokens) for c in result.captions] == [h.tokens for h in reference]
                _, boxes = model.encoder.detect(torch.tensor(scene).unsqueeze(0))
                regions = [(r.left, r.top, r.right, r.bottom) for r in result.regions]
                assert np.allclose(regions, boxes[0].detach().numpy(), atol=1e-5)
                assert all(
                    0 <= left <= right <= 1 and 0 <= top <= bottom <= 1
                    for left, top, right, bottom in regions
                )
                for caption, hypothesis in zip(result.captions, reference, strict=True):
                    assert caption.log_prob == pytest.approx(hypothesis.log_prob, abs=1e-4)
                    assert caption.mean_log_prob == pytest.approx(
                        caption.log_prob / (len(caption.tokens) + 1)
                    )
                    assert len(caption.attention) == len(caption.words)
                    for weights in caption.attention:  # one weight per region, in the regions' order
                        assert (weights.rows, weights.columns) == (len(regions), 1) == (4, 1)
                        assert sum(weights.weights) == pytest.approx(1.0, abs=1e-4)
    assert response.model == MODEL


def test_concurrent_captions_share_decoder_steps_and_match_those_alone(
    butd: tuple[RunningServer, Path], scenes: np.ndarray
) -> None:
    server, _ = butd
    options = [{"beam_size": 1 + i % 3, "count": 1 + i % 2 if i % 3 else 1} for i in range(len(scenes))]

    def key(response) -> list:
        result = response.results[0]
        return [
            [tuple(c.tokens) for c in result.captions],
            [(r.left, r.top, r.right, r.bottom) for r in result.regions],
        ]

    with VisionClient(server.target) as client:
        alone = [
            key(client.caption([_png(s)], model=MODEL, **o)) for s, o in zip(scenes, options, strict=True)
        ]

    async def crowd() -> list:
        async with AsyncVisionClient(server.target) as client:
            calls = [
                client.caption([_png(s)], model=MODEL, **o)
                for _ in range(4)
                for s, o in zip(scenes, options, strict=True)
            ]
            return await asyncio.gather(*calls)

    together = [key(r) for r in asyncio.run(crowd())]
    assert [words for words, _ in together] == [words for words, _ in alone * 4]
    for (_, batched), (_, single) in zip(together, alone * 4, strict=True):
        assert np.allclose(batched, single, atol=1e-5)  # the encoder ran in other batches
    text = urllib.request.urlopen(server.metrics_url).read().decode()
    prefix = f'convserve_decode_active_requests_bucket{{le="1.0",model="{MODEL}"'
    single_steps = [line for line in text.splitlines() if line.startswith(prefix)]
    count = [
        line
        for line in text.splitlines()
        if line.startswith(f'convserve_decode_active_requests_count{{model="{MODEL}"')
    ]
    # some steps advanced more than one request at once: the decode loop batched them
    assert float(single_steps[0].split()[-1]) < float(count[0].split()[-1])


def test_kserve_encoder_outputs_the_boxes_and_the_whole_model_captions(
    butd: tuple[RunningServer, Path], scenes: np.ndarray
) -> None:
    server, _ = butd
    with grpc.insecure_channel(server.target) as channel:
        stub = kserve_grpc.GRPCInferenceServiceStub(channel)
        encoder = stub.ModelMetadata(kserve_pb.ModelMetadataRequest(name=f"{MODEL}.encoder"))
        assert [t.name for t in encoder.outputs] == ["features", "projected", "h", "c", "boxes"]
        request = kserve_pb.ModelInferRequest(model_name=f"{MODEL}.encoder")
        images = np.ascontiguousarray(scenes[:2])
        request.inputs.add(name="image", datatype="UINT8", shape=list(images.shape))
        request.raw_input_contents.append(images.tobytes())
        response = stub.ModelInfer(request)
        outputs = {
            t.name: decode_output(t, raw)
            for t, raw in zip(response.outputs, response.raw_output_contents, strict=True)
        }
        assert outputs["boxes"].shape == (2, 4, 4) and outputs["features"].shape[:2] == (2, 4)
        whole = kserve_pb.ModelInferRequest(model_name=MODEL)
        whole.inputs.add(name="image", datatype="BYTES", shape=[1, 1])
        whole.raw_input_contents.append(encode_bytes(np.array([_png(scenes[0])], object)))
        answer = stub.ModelInfer(whole)
        caption = decode_output(answer.outputs[0], answer.raw_output_contents[0]).ravel()[0].decode()
    with VisionClient(server.target) as client:
        assert caption == client.caption([_png(scenes[0])], model=MODEL).results[0].captions[0].text


def test_http_and_cli_give_regions_and_draw_them_as_boxes(
    butd: tuple[RunningServer, Path], scenes: np.ndarray, tmp_path: Path
) -> None:
    server, _ = butd
    url = f"{server.http_url}/v1/caption?model={MODEL}&attention=1"
    body = json.loads(
        urllib.request.urlopen(urllib.request.Request(url, data=_png(scenes[0]), method="POST")).read()
    )
    assert len(body["regions"]) == 4 and all(len(box) == 4 for box in body["regions"])
    best = body["captions"][0]
    assert best["mean_log_prob"] == pytest.approx(best["log_prob"] / (len(best["words"]) + 1))
    assert len(best.get("attention", [])) == len(best["words"])
    assert all((a["rows"], a["columns"]) == (4, 1) for a in best.get("attention", []))

    image, picture = tmp_path / "scene.png", tmp_path / "attention.png"
    image.write_bytes(_png(scenes[0]))
    result = subprocess.run(
        [sys.executable, "-m", "service", "caption", str(image), "--target", server.target,
         "--model", MODEL, "--json", "--attention", str(picture)],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    words = json.loads(result.stdout)["captions"][0]["words"]
    with Image.open(picture) as opened:
        pixels = np.asarray(opened.convert("RGB")).astype(int)
    assert pixels.shape[1] == min(len(words) + 1, 6) * (128 + 4)
    # every word's panel outlines its most attended region in pure yellow; the image panel has no box
    outline = (pixels[..., 0] >= 200) & (pixels[..., 0] == pixels[..., 1]) & (pixels[..., 2] == 0)
    assert outline[:, 132:].sum() >= 20 * len(words)
    assert outline[:146, :132].sum() == 0
