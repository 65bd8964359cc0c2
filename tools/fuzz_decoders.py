"""Coverage-guided fuzzing (atheris/libFuzzer) of the request decoders: images, KServe tensors, JSON.

    .venv/bin/python tools/fuzz_decoders.py -max_total_time=60 [corpus_dir]

The first byte picks the target; the rest is its input:
- images: codecs.decode_encoded on the bytes, and codecs.decode_raw with a shape taken from them;
- tensors: the bytes parsed as a ModelInferRequest (protobuf), then tensors.decode_inputs;
- header: the bytes as a KServe v2 JSON infer body (json_tensors.decode_header);
- latents: the bytes as a generate body, {"latents": [[...]]} (json_tensors.decode_latents).
Each must return a well-formed result or raise InvalidArgument; anything else is a crash
(libFuzzer writes the input to crash-<sha1> and exits non-zero).
"""

from __future__ import annotations

import sys

import atheris
import numpy as np
from google.protobuf.message import DecodeError

with atheris.instrument_imports(include=["service", "PIL"]):
    from service._proto.inference import grpc_predict_v2_pb2 as pb
    from service.codecs import images as codecs
    from service.codecs import tensors
    from service.errors import InvalidArgument
    from service.transports.http import json_tensors

MAX_PIXELS = 1 << 16
MAX_ELEMENTS = 1 << 16


def fuzz_image(data: bytes) -> None:
    try:
        image = codecs.decode_encoded(data, MAX_PIXELS)
    except InvalidArgument:
        pass
    else:
        assert image.dtype == np.uint8 and image.ndim in (2, 3), image.shape
        assert image.shape[0] * image.shape[1] <= MAX_PIXELS
    fdp = atheris.FuzzedDataProvider(data)
    height, width, channels = (fdp.ConsumeIntInRange(0, 300) for _ in range(3))
    try:
        raw = codecs.decode_raw(fdp.ConsumeBytes(fdp.remaining_bytes()), height, width, channels, MAX_PIXELS)
    except InvalidArgument:
        return
    assert raw.shape[:2] == (height, width)


def fuzz_tensors(data: bytes) -> None:
    try:
        request = pb.ModelInferRequest.FromString(data)
    except DecodeError:
        return
    try:
        arrays = tensors.decode_inputs(request, max_elements=MAX_ELEMENTS)
    except InvalidArgument:
        return
    for tensor in request.inputs:
        array = arrays[tensor.name]
        assert list(array.shape) == list(tensor.shape)
        assert array.dtype == tensors.DATATYPES[tensor.datatype].dtype
        tensors.encode_output(tensor.name, array)  # and back


def fuzz_header(data: bytes) -> None:
    try:
        decoded = json_tensors.decode_header(data, len(data), "m", "")
    except InvalidArgument:
        return
    for tensor in decoded.with_binary_data(data).inputs:
        assert isinstance(tensor.raw, bytes), tensor.name


def fuzz_latents(data: bytes) -> None:
    try:
        latents = json_tensors.decode_latents(data)
    except InvalidArgument:
        return
    assert latents.dtype == np.float32 and latents.ndim == 2, latents.shape


TARGETS = (fuzz_image, fuzz_tensors, fuzz_header, fuzz_latents)


def test_one_input(data: bytes) -> None:
    if data:
        TARGETS[data[0] % len(TARGETS)](data[1:])


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
