"""Bad requests fail alone, with the right status and a message that names the problem."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from drawing import draw_digit, png_bytes

from service._proto.convserve.v1 import vision_pb2 as pb
from service.client import VisionClient


def _raw(data: bytes, height: int, width: int, channels: int) -> pb.Image:
    return pb.Image(raw=pb.RawImage(data=data, height=height, width=width, channels=channels))


GOOD_PNG = png_bytes(draw_digit("3"))

INVALID = {
    "empty bytes": ([pb.Image(encoded=b"")], {}, "empty"),
    "not an image": ([pb.Image(encoded=b"hello, this is text")], {}, "not a PNG, JPEG, BMP image"),
    "truncated png": ([pb.Image(encoded=GOOD_PNG[: len(GOOD_PNG) // 2])], {}, "truncated"),
    "no data at all": ([pb.Image()], {}, "neither encoded bytes nor a raw array"),
    "zero-sized raw": ([_raw(b"", 0, 0, 1)], {}, "zero size"),
    "raw length mismatch": ([_raw(b"\x00" * 10, 4, 4, 1)], {}, "10 bytes but 4x4x1 uint8 needs 16"),
    "raw bad channels": ([_raw(b"\x00" * 32, 4, 4, 2)], {}, "2 channels"),
    "top_k zero": ([pb.Image(encoded=GOOD_PNG)], {"top_k": 0}, "top_k must be > 0"),
    "top_k negative": ([pb.Image(encoded=GOOD_PNG)], {"top_k": -3}, "top_k must be > 0"),
    "no images": ([], {}, "no images"),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_argument_names_the_problem_and_server_keeps_serving(client: VisionClient, case: str) -> None:
    images, options, expected = INVALID[case]
    with pytest.raises(grpc.RpcError) as info:
        client.classify(images, **options)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert expected in info.value.details()
    assert client.classify([GOOD_PNG], top_k=1).results[0].predictions[0].label == "3"


def test_bad_image_among_good_ones_names_its_index(client: VisionClient) -> None:
    with pytest.raises(grpc.RpcError) as info:
        client.classify([GOOD_PNG, b"garbage"])
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("image 1:")


@pytest.mark.parametrize("side", [5_000, 50_000])
def test_image_that_claims_too_many_pixels_is_rejected_before_decoding(
    client: VisionClient, side: int
) -> None:
    """A few bytes of PNG header claiming a huge image: refused from the header, never decoded."""
    header_only = _png_header(side, side)
    assert len(header_only) < 100
    with pytest.raises(grpc.RpcError) as info:
        client.classify([header_only])
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "limit of 16000000 pixels" in info.value.details()


def test_unknown_model_and_version_are_not_found(client: VisionClient) -> None:
    for model, version, expected in [
        ("nope", "", "model 'nope' not found"),
        ("lenet5", "99", "no version '99'"),
    ]:
        with pytest.raises(grpc.RpcError) as info:
            client.classify([GOOD_PNG], model=model, version=version)
        assert info.value.code() is grpc.StatusCode.NOT_FOUND
        assert expected in info.value.details()


def test_missing_model_name_is_invalid(client: VisionClient) -> None:
    with pytest.raises(grpc.RpcError) as info:
        client.classify([GOOD_PNG], model="")
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT


def test_client_refuses_arrays_that_are_not_uint8(client: VisionClient) -> None:
    with pytest.raises(ValueError, match="uint8"):
        client.classify([np.zeros((8, 8), np.float32)])


def _png_header(width: int, height: int) -> bytes:
    """A tiny valid-looking PNG claiming width x height: IHDR, a few bytes of IDAT, IEND."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
