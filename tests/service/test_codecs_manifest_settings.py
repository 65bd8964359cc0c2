"""Decoding, the manifest schema, settings and the error table, without a server."""

from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from service.codecs import images as codecs
from service.contract.manifest import CaptionerSpec, InputSpec, Manifest, load_manifest, write_manifest
from service.errors import INTERNAL, InvalidArgument, ModelNotFound, ModelNotReady, status_of
from service.settings import Settings


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def test_decode_modes() -> None:
    assert codecs.decode_encoded(_encode(Image.new("L", (5, 4), 9), "PNG"), 100).shape == (4, 5)
    assert codecs.decode_encoded(_encode(Image.new("RGB", (5, 4)), "BMP"), 100).shape == (4, 5, 3)
    assert codecs.decode_encoded(_encode(Image.new("P", (5, 4)), "PNG"), 100).shape == (4, 5, 3)
    assert codecs.decode_encoded(_encode(Image.new("1", (5, 4)), "PNG"), 100).shape == (4, 5)


def test_formats_other_than_png_jpeg_bmp_are_refused() -> None:
    with pytest.raises(InvalidArgument, match="not a PNG, JPEG, BMP"):
        codecs.decode_encoded(_encode(Image.new("L", (5, 4)), "GIF"), 100)


def test_pixel_limit() -> None:
    with pytest.raises(InvalidArgument, match="over the limit of 19 pixels"):
        codecs.decode_encoded(_encode(Image.new("L", (5, 4)), "PNG"), 19)
    with pytest.raises(InvalidArgument, match="over the limit of 19 pixels"):
        codecs.decode_raw(b"\x00" * 20, 4, 5, 1, 19)


def test_raw_is_wrapped_without_copy() -> None:
    data = bytes(range(24))
    array = codecs.decode_raw(data, 2, 4, 3, 100)
    assert array.shape == (2, 4, 3)
    assert array[1, 3, 2] == 23
    assert not array.flags.owndata


def test_error_table() -> None:
    assert status_of(InvalidArgument("x")).code == grpc.StatusCode.INVALID_ARGUMENT
    assert status_of(ModelNotFound("y")).code == grpc.StatusCode.NOT_FOUND
    assert status_of(ModelNotReady("z")).code == grpc.StatusCode.UNAVAILABLE
    assert status_of(KeyError("secret path /etc")) is INTERNAL


def test_manifest_round_trip_and_validation(tmp_path) -> None:
    manifest = Manifest(
        name="m",
        kind="classifier",
        input=InputSpec(channels=3, height=8, width=8, color_mode="RGB"),
        adaptation={"kind": "resize"},
        labels=["a", "b"],
    )
    write_manifest(tmp_path, manifest)
    assert load_manifest(tmp_path) == manifest
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]
    with pytest.raises(ValidationError, match="needs 1 channel"):
        InputSpec(channels=3, height=8, width=8, color_mode="L")
    with pytest.raises(ValidationError):
        Manifest.model_validate({**manifest.model_dump(), "surprise": 1})


def test_settings_from_env_and_overrides(monkeypatch) -> None:
    monkeypatch.setenv("CONVSERVE_GRPC_PORT", "9001")
    monkeypatch.setenv("CONVSERVE_PROVIDERS", '["CPUExecutionProvider"]')
    settings = Settings()
    assert settings.grpc_port == 9001
    assert settings.providers == ["CPUExecutionProvider"]
    assert settings.metrics_port == 8002
    assert Settings(grpc_port=7001).grpc_port == 7001
    monkeypatch.setenv("CONVSERVE_GRPC_PORT", "not-a-port")
    with pytest.raises(ValidationError):
        Settings()


def test_softmax_top_k_ranking() -> None:
    from service.kinds.classifier import ClassifierPipeline

    pipeline = ClassifierPipeline.__new__(ClassifierPipeline)
    pipeline.manifest = Manifest(
        name="m",
        kind="classifier",
        input=InputSpec(channels=1, height=8, width=8, color_mode="L"),
        adaptation={"kind": "resize"},
        labels=["a", "b", "c"],
    )
    pipeline.labels = pipeline.manifest.labels
    ranked = pipeline.rank(np.array([[0.0, 2.0, 1.0], [1000.0, 0.0, 0.0]]), top_k=2)
    assert [p.label for p in ranked[0]] == ["b", "c"]
    assert ranked[1][0].score == pytest.approx(1.0)
    assert ranked[0][0].score == pytest.approx(np.exp(2) / (1 + np.exp(1) + np.exp(2)))


def test_version_policies() -> None:
    from service.contract.manifest import VersionPolicy

    on_disk = ["5", "3", "2", "1"]  # newest first, as the repository lists them
    assert VersionPolicy().select(on_disk) == ["5"]
    assert VersionPolicy(latest=2).select(on_disk) == ["5", "3"]
    assert VersionPolicy(all=True).select(on_disk) == on_disk
    assert VersionPolicy(specific=[1, 3, 9]).select(on_disk) == ["3", "1"]
    with pytest.raises(ValidationError, match="choose one"):
        VersionPolicy(latest=1, all=True)


def test_malformed_headers_are_invalid_arguments() -> None:
    bmp = bytearray(_encode(Image.new("L", (5, 4)), "BMP"))
    bmp[14:18] = (200).to_bytes(4, "little")  # an impossible DIB header size
    for data in (bytes(bmp), _encode(Image.new("RGB", (40, 40)), "JPEG")[:30]):
        with pytest.raises(InvalidArgument):
            codecs.decode_encoded(data, 10_000)


def test_reserved_model_names() -> None:
    with pytest.raises(ValidationError, match="reserved"):
        Manifest(name="liveness", kind="tensor")
    with pytest.raises(ValidationError):
        Manifest(name="../escape", kind="tensor")


def test_a_captioner_attends_over_a_grid_or_over_regions_never_both() -> None:
    words = {"vocabulary": ["<pad>", "<start>", "<end>", "<unk>", "a"], "start_token": 1, "end_token": 2}
    assert CaptionerSpec(**words, max_length=17, grid=(8, 8)).positions == 64
    regions = CaptionerSpec(**words, max_length=17, max_repeats=3, regions=4)
    assert (regions.positions, regions.max_repeats) == (4, 3)
    for layout in ({}, {"grid": (8, 8), "regions": 4}):
        with pytest.raises(ValidationError, match="a grid or over regions: give exactly one"):
            CaptionerSpec(**words, max_length=17, **layout)
    with pytest.raises(ValidationError):
        CaptionerSpec(**words, max_length=17, grid=(8, 8), max_repeats=0)
