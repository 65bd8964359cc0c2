"""Hostile input to every decoder, in-process, with hypothesis.

The property everywhere: a decoder either returns a well-formed result (the shape and dtype the
request claims) or raises InvalidArgument, the domain error that the server maps to
INVALID_ARGUMENT. Any other exception (IndexError, numpy's ValueError, MemoryError,
struct.error, PIL's own errors) would reach the client as INTERNAL: a bug.

Runs are derandomized (the same examples every run, so CI is reproducible) and bounded.
"""

from __future__ import annotations

import io
import json
import resource
import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image, ImageFile

from service._proto.inference import grpc_predict_v2_pb2 as pb
from service.codecs import images as codecs
from service.codecs import tensors
from service.contract import preprocessing as imaging
from service.contract.manifest import DigitAdaptation
from service.errors import InvalidArgument

InputTensor = pb.ModelInferRequest.InferInputTensor
OutputTensor = pb.ModelInferResponse.InferOutputTensor

FUZZ = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
#: Small limits keep every example cheap; the arithmetic is the same at the server's limits.
MAX_PIXELS = 4096
MAX_ELEMENTS = 10_000


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _png_claiming(width: int, height: int, color_type: int = 0, depth: int = 8) -> bytes:
    """A tiny PNG: a real IHDR claiming width x height, a few bytes of IDAT, IEND."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 256)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _bmp_claiming(width: int, height: int, bits: int = 24) -> bytes:
    """A BMP header (BITMAPINFOHEADER) claiming width x height with 16 bytes of pixels."""
    pixels = b"\x80" * 16
    header = struct.pack("<IiiHHIIiiII", 40, width, height, 1, bits, 0, len(pixels), 2835, 2835, 0, 0)
    offset = 14 + len(header)
    return b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset) + header + pixels


def _jpeg_claiming(width: int, height: int) -> bytes:
    """A real small JPEG whose SOF0 frame header is patched to claim width x height."""
    data = bytearray(SEEDS["jpeg-grey"])
    sof = data.find(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height & 0xFFFF, width & 0xFFFF)
    return bytes(data)


_GREY = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4, mode="L")
_RGBA = Image.fromarray(np.random.default_rng(0).integers(0, 256, (6, 5, 4), dtype=np.uint8), mode="RGBA")
SEEDS: dict[str, bytes] = {
    "png-grey": _encode(_GREY, "PNG"),
    "png-rgba": _encode(_RGBA, "PNG"),
    "png-palette": _encode(_RGBA.convert("P"), "PNG"),
    "png-1bit": _encode(_GREY.convert("1"), "PNG"),
    "png-16bit": _encode(Image.fromarray(np.arange(64, dtype=np.uint16).reshape(8, 8) * 999), "PNG"),
    "jpeg-grey": _encode(_GREY, "JPEG"),
    "jpeg-rgb": _encode(_RGBA.convert("RGB"), "JPEG"),
    "jpeg-cmyk": _encode(_RGBA.convert("CMYK"), "JPEG"),
    "bmp-rgb": _encode(_RGBA.convert("RGB"), "BMP"),
    "bmp-palette": _encode(_GREY.convert("P"), "BMP"),
}


def _check_image(data: bytes, max_pixels: int = MAX_PIXELS) -> None:
    try:
        image = codecs.decode_encoded(data, max_pixels)
    except InvalidArgument:
        return
    assert isinstance(image, np.ndarray) and image.dtype == np.uint8
    assert image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3), image.shape
    assert 0 < image.shape[0] * image.shape[1] <= max_pixels


# --- encoded images ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_seed_images_decode(name: str) -> None:
    image = codecs.decode_encoded(SEEDS[name], MAX_PIXELS)
    assert image.dtype == np.uint8 and image.shape[:2] in ((8, 8), (6, 5))


@FUZZ
@given(st.binary(max_size=4096))
@example(b"")
@example(b"\x89PNG\r\n\x1a\n")
@example(b"BM")
@example(b"\xff\xd8\xff")
@example(b"GIF89a" + b"\x00" * 20)  # a real format, but not one we accept
def test_arbitrary_bytes_decode_or_are_invalid(data: bytes) -> None:
    _check_image(data)


@FUZZ
@given(st.sampled_from(sorted(SEEDS)), st.data())
def test_truncated_images_decode_or_are_invalid(name: str, data: st.DataObject) -> None:
    seed = SEEDS[name]
    cut = data.draw(st.integers(0, len(seed)), label="cut")
    _check_image(seed[:cut])


@FUZZ
@given(
    st.sampled_from(sorted(SEEDS)),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=8),
)
def test_corrupted_images_decode_or_are_invalid(name: str, flips: list[tuple[int, int]]) -> None:
    data = bytearray(SEEDS[name])
    for position, value in flips:
        data[position % len(data)] = value
    _check_image(bytes(data))


@FUZZ
@given(
    st.sampled_from(["png", "bmp", "jpeg"]),
    st.integers(-(2**31), 2**32 - 1),
    st.integers(-(2**31), 2**32 - 1),
)
@example("png", 50_000, 50_000)
@example("png", 0, 0)
@example("png", 2**31, 1)
@example("bmp", -64, -64)
@example("bmp", 2**31 - 1, 2**31 - 1)
@example("jpeg", 65_535, 65_535)
@example("jpeg", 0, 8)
def test_images_that_claim_any_size_decode_or_are_invalid(fmt: str, width: int, height: int) -> None:
    if fmt == "png":
        data = _png_claiming(width & 0xFFFFFFFF, height & 0xFFFFFFFF)
    elif fmt == "bmp":
        data = _bmp_claiming(max(-(2**31), min(width, 2**31 - 1)), max(-(2**31), min(height, 2**31 - 1)))
    else:
        data = _jpeg_claiming(width, height)
    _check_image(data)


@pytest.mark.parametrize(
    "data",
    [_png_claiming(50_000, 50_000), _png_claiming(5_000, 5_000, color_type=6), _bmp_claiming(50_000, 50_000)],
    ids=["png-50000x50000", "png-rgba-5000x5000", "bmp-50000x50000"],
)
def test_image_claiming_huge_size_is_rejected_from_its_header(
    data: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Refused before any pixel is decoded: no load(), no pixel buffer (50000^2 would be 2.5 GB)."""
    assert len(data) < 200

    def no_decoding(self: Image.Image) -> None:
        raise AssertionError("the decoder ran: the size was not checked from the header")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    with pytest.raises(InvalidArgument, match="pixels"):
        codecs.decode_encoded(data, 16_000_000)  # the server's default limit
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 100, f"peak memory grew by {grown_mib:.0f} MiB"


# --- raw images and what the pipelines do with them -------------------------------------------


@FUZZ
@given(
    st.binary(max_size=512),
    st.integers(-5, 2**32 - 1) | st.integers(0, 20),
    st.integers(-5, 2**32 - 1) | st.integers(0, 20),
    st.integers(-1, 6),
)
@example(b"\x00" * 16, 4, 4, 1)
@example(b"\x00" * 15, 4, 4, 1)
@example(b"", 2**32 - 1, 2**32 - 1, 3)
def test_raw_images_wrap_or_are_invalid(data: bytes, height: int, width: int, channels: int) -> None:
    try:
        image = codecs.decode_raw(data, height, width, channels, MAX_PIXELS)
    except InvalidArgument:
        return
    assert image.dtype == np.uint8
    assert image.shape == ((height, width) if channels == 1 else (height, width, channels))


@FUZZ
@given(
    hnp.arrays(
        np.uint8,
        st.tuples(st.integers(1, 40), st.integers(1, 40)) | st.tuples(*(st.integers(1, 24),) * 2, st.just(3)),
    )
)
def test_any_decoded_image_reaches_the_model_input(image: np.ndarray) -> None:
    """What the pipelines do after decoding (colour mode, digit adaptation, resize) never fails."""
    grey = imaging.to_color_mode(image, "L")
    adapted = imaging.adapt_digit(grey, DigitAdaptation(), 32, 32)
    assert adapted.shape == (32, 32) and adapted.dtype == np.uint8
    rgb = imaging.resize(imaging.to_color_mode(image, "RGB"), 64, 64)
    assert rgb.shape == (64, 64, 3) and rgb.dtype == np.uint8


# --- KServe tensors ---------------------------------------------------------------------------

DATATYPE_NAMES = st.sampled_from(tensors.SUPPORTED) | st.sampled_from(["", "FP8", "uint8", "STRING", "\xff"])
#: Mostly small dims (so data of the right size can exist), sometimes anything an int64 holds.
DIM = st.integers(0, 4) | st.integers(-3, -1) | st.integers(-(2**63), 2**63 - 1)
SHAPE = st.lists(DIM, max_size=5)
# What each InferTensorContents field holds on the wire.
CONTENT_VALUES = {
    "bool_contents": st.booleans(),
    "int_contents": st.integers(-(2**31), 2**31 - 1),
    "int64_contents": st.integers(-(2**63), 2**63 - 1),
    "uint_contents": st.integers(0, 2**32 - 1),
    "uint64_contents": st.integers(0, 2**64 - 1),
    "fp32_contents": st.floats(width=32),
    "fp64_contents": st.floats(),
    "bytes_contents": st.binary(max_size=8),
}


def _claimed_count(shape: list[int]) -> int | None:
    """The element count when every dim is small and non-negative, else None."""
    if any(d < 0 or d > 100 for d in shape):
        return None
    return int(np.prod(shape, dtype=np.int64))


def _check_tensor(tensor: InputTensor, raw: bytes | None) -> None:
    try:
        array = tensors.decode_input(tensor, raw, max_elements=MAX_ELEMENTS)
    except InvalidArgument:
        return
    kind = tensors.DATATYPES[tensor.datatype]
    assert isinstance(array, np.ndarray)
    assert list(array.shape) == list(tensor.shape)
    assert array.dtype == kind.dtype
    if kind.name == "BYTES":
        assert all(isinstance(x, bytes) for x in array.ravel())


@st.composite
def raw_tensors(draw: st.DrawFn) -> tuple[InputTensor, bytes]:
    name = draw(DATATYPE_NAMES)
    shape = draw(SHAPE)
    count = _claimed_count(shape)
    kind = tensors.DATATYPES.get(name)
    if kind is not None and kind.name == "BYTES" and count is not None and draw(st.booleans()):
        elements = draw(st.lists(st.binary(max_size=6), min_size=count, max_size=count))
        raw = tensors.encode_bytes(elements)
        cut = draw(st.sampled_from([0, 0, 1, 3, 4]))  # sometimes truncated, inside a length or data
        raw = raw[: len(raw) - cut] + draw(st.sampled_from([b"", b"", b"\x00", b"\xff\xff\xff\xff"]))
    elif kind is not None and kind.name != "BYTES" and count is not None and draw(st.booleans()):
        size = count * kind.dtype.itemsize + draw(st.sampled_from([0, 0, 0, -1, 1, kind.dtype.itemsize]))
        raw = draw(st.binary(min_size=max(size, 0), max_size=max(size, 0)))
    else:
        raw = draw(st.binary(max_size=64))
    return InputTensor(name="x", datatype=name, shape=shape), raw


@FUZZ
@given(raw_tensors())
@example((InputTensor(name="x", datatype="FP32", shape=[2**62, 2**62, 16]), b""))
@example((InputTensor(name="x", datatype="UINT8", shape=[-1, 4]), b"\x00" * 4))
@example((InputTensor(name="x", datatype="UINT8", shape=[0, 2**63 - 1]), b""))
@example((InputTensor(name="x", datatype="BOOL", shape=[2]), b"\x01\x02"))
@example((InputTensor(name="x", datatype="BYTES", shape=[3]), b"\x01\x00\x00\x00a"))
@example((InputTensor(name="x", datatype="BYTES", shape=[1]), b"\xff\xff\xff\xffabc"))
@example((InputTensor(name="x", datatype="FP16", shape=[]), b"\x00\x3c"))
def test_raw_contents_decode_or_are_invalid(case: tuple[InputTensor, bytes]) -> None:
    _check_tensor(*case)


@st.composite
def typed_tensors(draw: st.DrawFn) -> InputTensor:
    name = draw(DATATYPE_NAMES)
    shape = draw(SHAPE)
    count = _claimed_count(shape)
    kind = tensors.DATATYPES.get(name)
    tensor = InputTensor(name="x", datatype=name, shape=shape)
    # Usually the field the datatype uses, sometimes another one (or several).
    fields = draw(st.lists(st.sampled_from(sorted(CONTENT_VALUES)), max_size=2))
    if kind is not None and kind.contents is not None and draw(st.booleans()):
        fields.append(kind.contents)
    for field in fields:
        size = count if count is not None and draw(st.booleans()) else draw(st.integers(0, 6))
        values = draw(st.lists(CONTENT_VALUES[field], min_size=size, max_size=size))
        getattr(tensor.contents, field).extend(values)
    if not fields and draw(st.booleans()):
        tensor.contents.SetInParent()  # contents present but empty
    return tensor


@FUZZ
@given(typed_tensors())
@example(
    InputTensor(
        name="x", datatype="UINT8", shape=[2], contents=pb.InferTensorContents(uint_contents=[1, 256])
    )
)
@example(
    InputTensor(name="x", datatype="INT8", shape=[1], contents=pb.InferTensorContents(int_contents=[-129]))
)
@example(
    InputTensor(name="x", datatype="FP16", shape=[1], contents=pb.InferTensorContents(fp32_contents=[1.0]))
)
@example(
    InputTensor(name="x", datatype="FP32", shape=[1], contents=pb.InferTensorContents(fp32_contents=[np.nan]))
)
@example(
    InputTensor(
        name="x", datatype="UINT64", shape=[1], contents=pb.InferTensorContents(uint64_contents=[2**64 - 1])
    )
)
@example(
    InputTensor(
        name="x", datatype="BYTES", shape=[1], contents=pb.InferTensorContents(bytes_contents=[b"\xff"])
    )
)
def test_typed_contents_decode_or_are_invalid(tensor: InputTensor) -> None:
    _check_tensor(tensor, None)


@FUZZ
@given(
    st.lists(st.tuples(st.sampled_from(["a", "b", "a"]), raw_tensors()), max_size=3),
    st.integers(-1, 1),
    st.booleans(),
)
def test_whole_requests_decode_or_are_invalid(
    inputs: list[tuple[str, tuple[InputTensor, bytes]]], raw_count_delta: int, mixed: bool
) -> None:
    """raw_input_contents count off by one, duplicate names, raw and typed contents mixed."""
    request = pb.ModelInferRequest(model_name="m")
    for name, (tensor, raw) in inputs:
        tensor.name = name
        if mixed:
            tensor.contents.bytes_contents.append(b"x")
        request.inputs.append(tensor)
        request.raw_input_contents.append(raw)
    if raw_count_delta < 0:
        del request.raw_input_contents[:1]
    elif raw_count_delta > 0:
        request.raw_input_contents.append(b"")
    try:
        arrays = tensors.decode_inputs(request, max_elements=MAX_ELEMENTS)
    except InvalidArgument:
        return
    assert sorted(arrays) == sorted(t.name for t in request.inputs)
    for tensor in request.inputs:
        assert list(arrays[tensor.name].shape) == list(tensor.shape)


@FUZZ
@given(st.lists(st.integers(-(2**63), 2**63 - 1), max_size=8))
@example([2**32, 2**32])  # the product overflows int64
@example([0, -1])
@example([0, 2**40])
def test_element_count_is_exact_or_invalid(shape: list[int]) -> None:
    try:
        count = tensors.element_count(shape, max_elements=MAX_ELEMENTS)
    except InvalidArgument:
        assert (
            any(d < 0 for d in shape)
            or any(d > MAX_ELEMENTS for d in shape)
            or (0 not in shape and np.prod([float(d) for d in shape]) > MAX_ELEMENTS)
        )
        return
    product = 1
    for dim in shape:
        product *= dim
    assert count == product <= MAX_ELEMENTS


# --- the conversions back ---------------------------------------------------------------------

NUMERIC_DTYPES = [tensors.DATATYPES[n].dtype for n in tensors.SUPPORTED if n != "BYTES"]
SMALL_SHAPES = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)


@st.composite
def arrays_of_every_datatype(draw: st.DrawFn) -> np.ndarray:
    if draw(st.integers(0, len(NUMERIC_DTYPES))) == 0:
        shape = draw(SMALL_SHAPES)
        values = draw(
            st.lists(st.binary(max_size=5), min_size=int(np.prod(shape)), max_size=int(np.prod(shape)))
        )
        array = np.empty(len(values), dtype=object)
        array[:] = values
        return array.reshape(shape)
    dtype = draw(st.sampled_from(NUMERIC_DTYPES))
    return draw(hnp.arrays(dtype, SMALL_SHAPES))


def _same(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.shape == expected.shape
    if expected.dtype == object:
        assert actual.ravel().tolist() == expected.ravel().tolist()
    else:
        assert actual.dtype == expected.dtype
        assert actual.tobytes() == expected.tobytes()  # bit-exact, NaN payloads included


@FUZZ
@given(arrays_of_every_datatype())
def test_outputs_round_trip_raw(array: np.ndarray) -> None:
    tensor, raw = tensors.encode_output("y", array)
    _same(tensors.decode_output(tensor, raw, max_elements=MAX_ELEMENTS), array)


@FUZZ
@given(arrays_of_every_datatype())
def test_arrays_round_trip_typed(array: np.ndarray) -> None:
    name = tensors.datatype_of(array.dtype)
    if tensors.DATATYPES[name].contents is None:
        with pytest.raises(ValueError, match="no typed contents"):
            tensors.encode_typed(array)
        return
    tensor = InputTensor(name="y", datatype=name, shape=array.shape, contents=tensors.encode_typed(array))
    _same(tensors.decode_input(tensor, None, max_elements=MAX_ELEMENTS), array)


# --- coverage-guided fuzzing (atheris), bounded ---------------------------------------------


def test_fuzz_decoders_runs_clean(tmp_path) -> None:
    """tools/fuzz_decoders.py from a seed corpus, a fixed number of runs and seed: exits 0, no crash."""
    pytest.importorskip("atheris")  # a dev dependency; absent only on platforms without its wheel
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name, data in SEEDS.items():
        (corpus / f"image-{name}").write_bytes(b"\x00" + data)
    for datatype, array in [("UINT8", np.zeros((1, 2), np.uint8)), ("FP32", np.ones(3, np.float32))]:
        request = pb.ModelInferRequest(model_name="m")
        request.inputs.add(name="x", datatype=datatype, shape=array.shape)
        request.raw_input_contents.append(array.tobytes())
        (corpus / f"tensor-raw-{datatype}").write_bytes(b"\x01" + request.SerializeToString())
    typed = pb.ModelInferRequest(model_name="m")
    typed.inputs.add(name="s", datatype="BYTES", shape=[2]).contents.bytes_contents.extend([b"a", b""])
    (corpus / "tensor-typed-bytes").write_bytes(b"\x01" + typed.SerializeToString())
    header = {"inputs": [{"name": "x", "shape": [2, 1], "datatype": "FP32", "data": [[1.5], [2]]}]}
    (corpus / "json-header").write_bytes(b"\x02" + json.dumps(header).encode())
    (corpus / "json-latents").write_bytes(b"\x03" + json.dumps({"latents": [[0.5, -1, 2e3]]}).encode())
    done = subprocess.run(
        [
            sys.executable,
            str(root / "tools" / "fuzz_decoders.py"),
            "-runs=20000",
            "-seed=1",
            "-max_len=4096",
            f"-artifact_prefix={tmp_path}/",
            str(corpus),
        ],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "Done 20000 runs" in done.stderr
    assert not list(tmp_path.glob("crash-*"))
