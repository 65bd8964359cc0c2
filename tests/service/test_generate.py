"""Generate through a real server, on a small ONNX generator built here (the DCGAN's quality is the
trainer's business; seeds, labels, batching, limits and encodings are the server's)."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml
from conftest import RunningServer, start_server
from PIL import Image
from toy_models import toy_generator

from service._proto.inference import grpc_predict_v2_pb2 as kserve_pb
from service._proto.inference import grpc_predict_v2_pb2_grpc as kserve_grpc
from service.client import AsyncVisionClient, VisionClient

LATENT = 64


def _toy_generator(path: Path) -> None:
    toy_generator(path, LATENT)


@pytest.fixture(scope="module")
def gen_server(trained_lenet: Path, tmp_path_factory: pytest.TempPathFactory):
    repository = tmp_path_factory.mktemp("gen") / "models"
    import shutil

    shutil.copytree(trained_lenet, repository)
    _toy_generator(repository / "toygen" / "1" / "model.onnx")
    manifest = {
        "name": "toygen",
        "kind": "generator",
        "labels": ["zero", "one", "two"],
        "generator": {"latent_size": LATENT, "height": 8, "width": 8},
    }
    (repository / "toygen" / "config.yaml").write_text(yaml.safe_dump(manifest))
    server = start_server(
        repository, repository.parent / "server.log", {"CONVSERVE_MAX_GENERATE_COUNT": "32"}
    )
    yield server
    server.stop()


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


def test_same_seed_same_bytes_other_seed_other_images(gen_server: RunningServer) -> None:
    with VisionClient(gen_server.target) as client:
        first = client.generate("toygen", count=4, labels=[1], seed=7)
        again = client.generate("toygen", count=4, labels=[1], seed=7)
        other = client.generate("toygen", count=4, labels=[1], seed=8)
    assert first.seed == 7
    assert [i.png for i in first.images] == [i.png for i in again.images]
    assert [i.png for i in first.images] != [i.png for i in other.images]
    assert _pixels(first.images[0].png).shape == (8, 8)


def test_determinism_holds_whatever_else_is_batched(gen_server: RunningServer) -> None:
    async def main() -> tuple[list[bytes], list[bytes]]:
        async with AsyncVisionClient(gen_server.target) as client:
            alone = await client.generate("toygen", count=5, labels=[2], seed=42)
            crowd = [client.generate("toygen", count=1 + i % 7, seed=i) for i in range(24)]
            target = client.generate("toygen", count=5, labels=[2], seed=42)
            results = await asyncio.gather(*crowd[:12], target, *crowd[12:])
            return [i.png for i in alone.images], [i.png for i in results[12].images]

    alone, batched = asyncio.run(main())
    assert alone == batched


def test_labels_control_the_images(gen_server: RunningServer) -> None:
    with VisionClient(gen_server.target) as client:
        zero = client.generate("toygen", count=2, labels=[0], seed=3)
        two = client.generate("toygen", count=2, labels=[2], seed=3)
        mixed = client.generate("toygen", count=3, labels=[2, 0, 1], seed=3)
        free = client.generate("toygen", count=16, seed=5)
    assert [i.label for i in zero.images] == ["zero", "zero"]
    assert _pixels(two.images[0].png).astype(int).mean() > _pixels(zero.images[0].png).astype(int).mean()
    assert [(i.label_index, i.label) for i in mixed.images] == [(2, "two"), (0, "zero"), (1, "one")]
    assert {i.label_index for i in free.images} <= {0, 1, 2}
    assert len({i.label_index for i in free.images}) > 1  # random labels when none are given


def test_fresh_seed_is_returned_and_reproduces(gen_server: RunningServer) -> None:
    with VisionClient(gen_server.target) as client:
        fresh = client.generate("toygen", count=2)
        replay = client.generate("toygen", count=2, seed=fresh.seed)
    assert fresh.seed != 0
    assert [i.png for i in fresh.images] == [i.png for i in replay.images]
    assert [i.label for i in fresh.images] == [i.label for i in replay.images]


def test_grid(gen_server: RunningServer) -> None:
    with VisionClient(gen_server.target) as client:
        response = client.generate("toygen", count=6, seed=1, grid=True)
    assert all(image.png == b"" for image in response.images)
    assert _pixels(response.grid_png).shape == (2 * 8 + 2, 3 * 8 + 2 * 2)  # 3 columns, 2 rows, 2 px gaps


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({"count": 0}, "count must be 1..32, got 0"),
        ({"count": 33}, "count must be 1..32, got 33"),
        ({"count": 2, "labels": [3]}, "label 3 outside the classes 0..2"),
        ({"count": 2, "labels": [-1]}, "label -1 outside the classes 0..2"),
        ({"count": 3, "labels": [0, 1]}, "2 labels for 3 images"),
        ({"count": 5, "labels": [5, 6, 7, 8, 9]}, "label 5, 6, 7 and 2 more outside the classes 0..2"),
    ],
)
def test_bad_requests_are_invalid(gen_server: RunningServer, kwargs: dict, expected: str) -> None:
    with VisionClient(gen_server.target) as client, pytest.raises(grpc.RpcError) as info:
        client.generate("toygen", **kwargs)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert expected in info.value.details()


def test_models_of_the_wrong_kind(gen_server: RunningServer) -> None:
    with VisionClient(gen_server.target) as client:
        with pytest.raises(grpc.RpcError) as info:
            client.generate("lenet5")
        assert "not a generator" in info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            client.classify([np.zeros((8, 8), np.uint8)], model="toygen")
        assert "not a classifier" in info.value.details()


def test_generator_through_kserve_raw_tensors(gen_server: RunningServer) -> None:
    request = kserve_pb.ModelInferRequest(model_name="toygen")
    request.inputs.add(name="z", datatype="FP32", shape=[2, LATENT])
    request.inputs.add(name="label", datatype="INT64", shape=[2])
    request.raw_input_contents.append(np.zeros((2, LATENT), np.float32).tobytes())
    request.raw_input_contents.append(np.array([0, 2], np.int64).tobytes())
    with grpc.insecure_channel(gen_server.target) as channel:
        response = kserve_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    images = np.frombuffer(response.raw_output_contents[0], np.uint8).reshape(2, 1, 8, 8)
    assert (images[0] == 128).all() and (images[1] == 188).all()


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "service", *args], capture_output=True, text=True, timeout=60
    )


def test_cli_generate(gen_server: RunningServer, tmp_path: Path) -> None:
    out = tmp_path / "grid.png"
    common = ("--model", "toygen", "--seed", "1", "--target", gen_server.target)
    done = _cli("generate", *common, "--label", "1", "--count", "4", "--grid", "--out", str(out), "--json")
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    assert (record["seed"], record["labels"], record["files"]) == (1, ["one"] * 4, [str(out)])
    assert _pixels(out.read_bytes()).shape == (18, 18)
    assert _cli("generate", *common, "--count", "2", "--out", str(tmp_path / "one.png")).returncode == 0
    assert (tmp_path / "one-0.png").exists() and (tmp_path / "one-1.png").exists()


def test_http_generate_route(gen_server: RunningServer) -> None:
    import urllib.error
    import urllib.request

    url = gen_server.http_url + "/v1/generate?model=toygen&count=4&label=2&seed=9"
    with urllib.request.urlopen(urllib.request.Request(url, data=b"", method="POST"), timeout=30) as response:
        assert response.headers["Content-Type"] == "image/png"
        assert (response.headers["x-seed"], response.headers["x-labels"]) == ("9", "two,two,two,two")
        grid = response.read()
    with VisionClient(gen_server.target) as client:
        assert grid == client.generate("toygen", count=4, labels=[2], seed=9, grid=True).grid_png
    bad = urllib.request.Request(
        gen_server.http_url + "/v1/generate?model=toygen&count=0", data=b"", method="POST"
    )
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(bad, timeout=30)
    assert info.value.code == 400
    assert json.loads(info.value.read())["error"] == "count must be 1..32, got 0"


def test_a_dcgan_published_by_the_trainer_serves_generate(trained_lenet: Path, tmp_path: Path) -> None:
    """The trainer's manifest and graph are what the server expects (quick training: shapes, not quality)."""
    from training import train_gan

    repository = tmp_path / "models"
    judge = trained_lenet.parent / "run" / "checkpoint.pt"
    train_gan.run(
        run_dir=tmp_path / "run",
        repository=repository,
        quick=True,
        progress=False,
        classifier_checkpoint=judge,
    )
    server = start_server(repository, tmp_path / "server.log")
    try:
        with VisionClient(server.target) as client:
            response = client.generate("dcgan", count=3, labels=[7], seed=11)
            again = client.generate("dcgan", count=3, labels=[7], seed=11)
        assert [i.label for i in response.images] == ["7"] * 3
        assert _pixels(response.images[0].png).shape == (32, 32)
        assert [i.png for i in response.images] == [i.png for i in again.images]
    finally:
        server.stop()
