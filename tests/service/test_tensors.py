"""The KServe v2 tensor codec, and wire compatibility of protos/inference with Triton's own classes."""

from __future__ import annotations

import base64
import io
import json
import re
import subprocess
import sys
import time
import tracemalloc

import numpy as np
import pytest
from google.protobuf import json_format

from service._proto.inference import grpc_predict_v2_pb2 as pb
from service._proto.inference import model_config_pb2 as config_pb
from service.codecs import tensors
from service.errors import InvalidArgument

InputTensor = pb.ModelInferRequest.InferInputTensor


def _sample(name: str, shape: tuple[int, ...] = (2, 3)) -> np.ndarray:
    """A array of the datatype `name` that exercises its range (extremes, signs, odd bytes)."""
    rng = np.random.default_rng(7)
    size = int(np.prod(shape))
    if name == "BYTES":
        pool = [b"", b"a", b"\x00\xff\x00", "é".encode(), b"x" * 300, b"tail"]
        out = np.empty(size, dtype=object)
        for i in range(size):
            out[i] = pool[i % len(pool)]
        return out.reshape(shape)
    dtype = tensors.DATATYPES[name].dtype
    if name == "BOOL":
        return rng.integers(0, 2, size).astype(bool).reshape(shape)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        values = rng.integers(info.min, info.max, size, dtype=dtype, endpoint=True)
        values[0], values[-1] = info.min, info.max
        return values.reshape(shape)
    values = rng.standard_normal(size).astype(dtype) * 1000
    values[0] = np.finfo(dtype).max
    return values.reshape(shape)


def _as_input(tensor: pb.ModelInferResponse.InferOutputTensor) -> InputTensor:
    return InputTensor(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)


def _assert_same(actual: np.ndarray, expected: np.ndarray, name: str) -> None:
    assert actual.shape == expected.shape
    assert actual.dtype == tensors.DATATYPES[name].dtype
    if name == "BYTES":
        assert actual.ravel().tolist() == [bytes(x) for x in expected.ravel()]
    else:
        np.testing.assert_array_equal(actual, expected)


# --- the datatype table -----------------------------------------------------------------------


def test_datatype_table_matches_model_config_enum() -> None:
    for name, kind in tensors.DATATYPES.items():
        enum_name = "TYPE_STRING" if name == "BYTES" else f"TYPE_{name}"
        assert tensors.config_datatype(name) == config_pb.DataType.Value(enum_name) == kind.config
    assert tensors.config_datatype("FP32") == 11 and tensors.config_datatype("BYTES") == 13


@pytest.mark.parametrize(
    ("onnx", "name"),
    [
        ("tensor(bool)", "BOOL"),
        ("tensor(uint8)", "UINT8"),
        ("tensor(uint16)", "UINT16"),
        ("tensor(uint32)", "UINT32"),
        ("tensor(uint64)", "UINT64"),
        ("tensor(int8)", "INT8"),
        ("tensor(int16)", "INT16"),
        ("tensor(int32)", "INT32"),
        ("tensor(int64)", "INT64"),
        ("tensor(float16)", "FP16"),
        ("tensor(float)", "FP32"),
        ("tensor(double)", "FP64"),
        ("tensor(string)", "BYTES"),
    ],
)
def test_onnx_types(onnx: str, name: str) -> None:
    assert tensors.datatype_from_onnx(onnx) == name
    assert tensors.DATATYPES[name].onnx == onnx


def test_datatype_of_numpy() -> None:
    assert tensors.datatype_of(np.dtype(np.uint8)) == "UINT8"
    assert tensors.datatype_of(np.float16) == "FP16"
    assert tensors.datatype_of(np.dtype(">f4")) == "FP32"  # byte order does not change the datatype
    assert tensors.datatype_of(np.dtype(bool)) == "BOOL"
    for text in (object, "S3", "U2"):
        assert tensors.datatype_of(np.dtype(text)) == "BYTES"
    with pytest.raises(ValueError, match="complex128"):
        tensors.datatype_of(np.complex128)
    with pytest.raises(ValueError, match="bfloat16"):
        tensors.datatype_from_onnx("tensor(bfloat16)")


def test_contents_field_of_each_datatype() -> None:
    fields = {name: kind.contents for name, kind in tensors.DATATYPES.items()}
    assert fields == {
        "BOOL": "bool_contents",
        "UINT8": "uint_contents",
        "UINT16": "uint_contents",
        "UINT32": "uint_contents",
        "UINT64": "uint64_contents",
        "INT8": "int_contents",
        "INT16": "int_contents",
        "INT32": "int_contents",
        "INT64": "int64_contents",
        "FP16": None,
        "FP32": "fp32_contents",
        "FP64": "fp64_contents",
        "BYTES": "bytes_contents",
    }
    for kind in tensors.DATATYPES.values():
        assert kind.dtype == kind.dtype.newbyteorder("<")  # little-endian whatever the host


# --- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", tensors.SUPPORTED)
def test_raw_round_trip(name: str) -> None:
    array = _sample(name)
    tensor, raw = tensors.encode_output("y", array)
    assert (tensor.name, tensor.datatype, list(tensor.shape)) == ("y", name, [2, 3])
    assert not tensor.HasField("contents")
    _assert_same(tensors.decode_input(_as_input(tensor), raw), array, name)
    _assert_same(tensors.decode_output(tensor, raw), array, name)


@pytest.mark.parametrize("name", [n for n in tensors.SUPPORTED if n != "FP16"])
def test_typed_round_trip(name: str) -> None:
    array = _sample(name)
    contents = tensors.encode_typed(array)
    field = tensors.DATATYPES[name].contents
    assert len(getattr(contents, field)) == array.size
    assert [f.name for f, _ in contents.ListFields()] == [field]
    tensor = InputTensor(name="x", datatype=name, shape=array.shape, contents=contents)
    # Through the wire, as a client would send it.
    tensor = InputTensor.FromString(tensor.SerializeToString())
    _assert_same(tensors.decode_input(tensor, None), array, name)


def test_fp16_is_raw_only() -> None:
    with pytest.raises(ValueError, match="FP16 has no typed contents"):
        tensors.encode_typed(np.zeros(2, np.float16))
    tensor = InputTensor(name="h", datatype="FP16", shape=[2])
    with pytest.raises(InvalidArgument, match="input 'h': FP16 has no typed contents field"):
        tensors.decode_input(tensor, None)


def test_bytes_raw_form_is_length_prefixed() -> None:
    tensor, raw = tensors.encode_output("s", np.array([b"ab", "é", b""], dtype=object))
    assert raw == b"\x02\x00\x00\x00ab" + b"\x02\x00\x00\x00\xc3\xa9" + b"\x00\x00\x00\x00"
    assert tensors.encode_bytes(["ab", b"c"]) == b"\x02\x00\x00\x00ab\x01\x00\x00\x00c"
    decoded = tensors.decode_input(_as_input(tensor), raw)
    assert decoded.dtype == object and decoded.tolist() == [b"ab", "é".encode(), b""]
    # numpy fixed-width strings are BYTES too
    tensor, raw = tensors.encode_output("u", np.array([["ab", "c"]]))
    assert tensor.datatype == "BYTES" and list(tensor.shape) == [1, 2]
    assert tensors.decode_input(_as_input(tensor), raw).tolist() == [[b"ab", b"c"]]
    with pytest.raises(ValueError, match="bytes or str, not int"):
        tensors.encode_bytes([1])


def test_raw_decode_is_zero_copy() -> None:
    raw = np.arange(24, dtype="<f4").tobytes()
    array = tensors.decode_input(InputTensor(name="x", datatype="FP32", shape=[2, 3, 4]), raw)
    assert not array.flags.owndata and not array.flags.writeable
    base = array
    while isinstance(base, np.ndarray):
        base = base.base
    assert base is raw
    assert array[1, 2, 3] == 23


def test_outputs_are_little_endian_and_contiguous() -> None:
    big = np.arange(6, dtype=">i4").reshape(2, 3).T  # big-endian and not C-contiguous
    tensor, raw = tensors.encode_output("y", big)
    assert tensor.datatype == "INT32" and list(tensor.shape) == [3, 2]
    assert raw == np.ascontiguousarray(big, dtype="<i4").tobytes()
    assert raw[:4] == b"\x00\x00\x00\x00" and raw[4:8] == b"\x03\x00\x00\x00"


def test_empty_tensors() -> None:
    for name in ("FP32", "BYTES"):
        array = tensors.decode_input(InputTensor(name="e", datatype=name, shape=[0, 5]), b"")
        assert array.shape == (0, 5)
        assert tensors.decode_input(InputTensor(name="e", datatype=name, shape=[0, 5]), None).shape == (0, 5)


def test_decode_inputs_pairs_raw_contents_in_order() -> None:
    request = pb.ModelInferRequest(model_name="m")
    for name, array in (("a", np.arange(4, dtype=np.uint8)), ("b", np.ones((2, 2), np.float64))):
        tensor, raw = tensors.encode_output(name, array)
        request.inputs.append(_as_input(tensor))
        request.raw_input_contents.append(raw)
    arrays = tensors.decode_inputs(pb.ModelInferRequest.FromString(request.SerializeToString()))
    assert list(arrays) == ["a", "b"]
    assert arrays["a"].tolist() == [0, 1, 2, 3] and arrays["b"].shape == (2, 2)

    typed = pb.ModelInferRequest(inputs=[InputTensor(name="t", datatype="INT64", shape=[2])])
    typed.inputs[0].contents.int64_contents.extend([-1, 2**40])
    assert tensors.decode_inputs(typed)["t"].tolist() == [-1, 2**40]

    del request.raw_input_contents[-1]
    with pytest.raises(InvalidArgument, match="1 raw_input_contents for 2 inputs"):
        tensors.decode_inputs(request)
    request.raw_input_contents.append(request.raw_input_contents[0])
    request.inputs[1].CopyFrom(request.inputs[0])
    with pytest.raises(InvalidArgument, match="input 'a' appears more than once"):
        tensors.decode_inputs(request)


# --- what a request may get wrong -------------------------------------------------------------


def test_wrong_byte_length_names_input_expected_and_received() -> None:
    tensor = InputTensor(name="image", datatype="UINT8", shape=[1, 1, 32, 32])
    message = "input 'image': shape [1, 1, 32, 32] of UINT8 needs 1024 bytes, got 1000 bytes"
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        tensors.decode_input(tensor, bytes(1000))
    with pytest.raises(InvalidArgument, match=re.escape("of FP32 needs 8 bytes, got 9 bytes")):
        tensors.decode_input(InputTensor(name="x", datatype="FP32", shape=[2]), bytes(9))


def test_wrong_content_count() -> None:
    tensor = InputTensor(name="x", datatype="FP32", shape=[2, 2])
    tensor.contents.fp32_contents.extend([1.0, 2.0, 3.0])
    with pytest.raises(InvalidArgument, match=re.escape("input 'x': shape [2, 2] of FP32 needs 4 values")):
        tensors.decode_input(tensor, None)
    # data in the field of another datatype counts as missing
    tensor = InputTensor(name="x", datatype="INT32", shape=[2])
    tensor.contents.fp32_contents.extend([1.0, 2.0])
    with pytest.raises(InvalidArgument, match="needs 2 values in int_contents, got 0"):
        tensors.decode_input(tensor, None)


def test_typed_values_out_of_range_of_a_narrow_datatype() -> None:
    tensor = InputTensor(name="x", datatype="UINT8", shape=[2])
    tensor.contents.uint_contents.extend([1, 256])
    with pytest.raises(InvalidArgument, match=re.escape("holds 256, out of the range of UINT8 [0, 255]")):
        tensors.decode_input(tensor, None)
    tensor = InputTensor(name="x", datatype="INT8", shape=[1])
    tensor.contents.int_contents.append(-129)
    with pytest.raises(InvalidArgument, match="holds -129"):
        tensors.decode_input(tensor, None)


def test_negative_dimension() -> None:
    with pytest.raises(InvalidArgument, match=re.escape("input 'x': shape [1, -1] has a negative dimension")):
        tensors.decode_input(InputTensor(name="x", datatype="FP32", shape=[1, -1]), b"")


def test_unknown_datatype_lists_supported_ones() -> None:
    with pytest.raises(InvalidArgument) as caught:
        tensors.decode_input(InputTensor(name="x", datatype="FLOAT32", shape=[1]), bytes(4))
    assert str(caught.value) == (
        "input 'x': unknown datatype 'FLOAT32'; supported: "
        "BOOL, UINT8, UINT16, UINT32, UINT64, INT8, INT16, INT32, INT64, FP16, FP32, FP64, BYTES"
    )
    with pytest.raises(InvalidArgument, match="unknown datatype 'BF16'"):
        tensors.config_datatype("BF16")


def test_raw_and_typed_contents_together() -> None:
    tensor = InputTensor(name="x", datatype="FP32", shape=[1])
    tensor.contents.fp32_contents.append(1.0)
    with pytest.raises(InvalidArgument, match="both typed contents and raw contents"):
        tensors.decode_input(tensor, bytes(4))


def test_malformed_bytes() -> None:
    tensor = InputTensor(name="s", datatype="BYTES", shape=[2])
    with pytest.raises(InvalidArgument, match="needs at least 8 bytes"):
        tensors.decode_input(tensor, b"\x01\x00\x00\x00a")
    with pytest.raises(InvalidArgument, match="ends inside the length of element 1"):
        tensors.decode_input(tensor, b"\x03\x00\x00\x00abc\x01\x00")
    with pytest.raises(InvalidArgument, match="BYTES element 0 claims 100 bytes, only 5 remain"):
        tensors.decode_input(tensor, b"\x64\x00\x00\x00abcde")
    with pytest.raises(InvalidArgument, match="2 bytes follow the last one"):
        tensors.decode_input(tensor, b"\x00\x00\x00\x00\x00\x00\x00\x00zz")


def test_bool_raw_bytes_must_be_0_or_1() -> None:
    with pytest.raises(InvalidArgument, match="BOOL raw data must be bytes 0 or 1"):
        tensors.decode_input(InputTensor(name="b", datatype="BOOL", shape=[2]), b"\x01\x02")


HUGE_SHAPE = [1_000_000_000, 3, 224, 224]
HUGE_COUNT = 1_000_000_000 * 3 * 224 * 224
BIG_SHAPE = [50_000, 3, 224, 224]  # every dimension under the cap, the product over it


@pytest.mark.parametrize(
    ("datatype", "shape", "raw", "max_elements", "message"),
    [
        # over the element cap: refused on the shape alone
        ("FP32", BIG_SHAPE, bytes(10), tensors.DEFAULT_MAX_ELEMENTS, "holds more than the 67108864"),
        ("UINT8", BIG_SHAPE, None, tensors.DEFAULT_MAX_ELEMENTS, "holds more than"),
        ("UINT8", HUGE_SHAPE, None, tensors.DEFAULT_MAX_ELEMENTS, "has a dimension of 1000000000"),
        ("FP32", [0, 1_000_000_000], b"", 1000, "has a dimension of 1000000000, more than the 1000"),
        # no cap to speak of: the length arithmetic alone refuses it
        ("FP32", HUGE_SHAPE, bytes(10), 2**62, f"needs {4 * HUGE_COUNT} bytes, got 10 bytes"),
        ("BYTES", HUGE_SHAPE, bytes(10), 2**62, f"needs at least {4 * HUGE_COUNT} bytes"),
        ("UINT8", HUGE_SHAPE, None, 2**62, f"needs {HUGE_COUNT} values in uint_contents, got 0"),
    ],
)
def test_huge_claimed_shape_is_refused_without_allocating(
    datatype: str, shape: list[int], raw: bytes | None, max_elements: int, message: str
) -> None:
    tensor = InputTensor(name="x", datatype=datatype, shape=shape)
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(InvalidArgument, match=re.escape(message)):
            tensors.decode_input(tensor, raw, max_elements=max_elements)
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 0.1
    assert peak < 256 * 1024


# --- wire compatibility -----------------------------------------------------------------------

# (message, field, number) for the fields tritonclient and perf_analyzer read and write.
TRITON_FIELD_NUMBERS = [
    (pb.ServerLiveResponse, "live", 1),
    (pb.ServerReadyResponse, "ready", 1),
    (pb.ModelReadyRequest, "name", 1),
    (pb.ModelReadyRequest, "version", 2),
    (pb.ServerMetadataResponse, "extensions", 3),
    (pb.ModelMetadataResponse, "versions", 2),
    (pb.ModelMetadataResponse, "platform", 3),
    (pb.ModelMetadataResponse, "inputs", 4),
    (pb.ModelMetadataResponse, "outputs", 5),
    (pb.ModelMetadataResponse.TensorMetadata, "shape", 3),
    (pb.InferParameter, "bool_param", 1),
    (pb.InferParameter, "int64_param", 2),
    (pb.InferParameter, "string_param", 3),
    (pb.InferParameter, "double_param", 4),
    (pb.InferParameter, "uint64_param", 5),
    (pb.InferTensorContents, "bool_contents", 1),
    (pb.InferTensorContents, "int_contents", 2),
    (pb.InferTensorContents, "int64_contents", 3),
    (pb.InferTensorContents, "uint_contents", 4),
    (pb.InferTensorContents, "uint64_contents", 5),
    (pb.InferTensorContents, "fp32_contents", 6),
    (pb.InferTensorContents, "fp64_contents", 7),
    (pb.InferTensorContents, "bytes_contents", 8),
    (pb.ModelInferRequest, "model_name", 1),
    (pb.ModelInferRequest, "model_version", 2),
    (pb.ModelInferRequest, "id", 3),
    (pb.ModelInferRequest, "parameters", 4),
    (pb.ModelInferRequest, "inputs", 5),
    (pb.ModelInferRequest, "outputs", 6),
    (pb.ModelInferRequest, "raw_input_contents", 7),
    (pb.ModelInferRequest.InferInputTensor, "name", 1),
    (pb.ModelInferRequest.InferInputTensor, "datatype", 2),
    (pb.ModelInferRequest.InferInputTensor, "shape", 3),
    (pb.ModelInferRequest.InferInputTensor, "parameters", 4),
    (pb.ModelInferRequest.InferInputTensor, "contents", 5),
    (pb.ModelInferRequest.InferRequestedOutputTensor, "name", 1),
    (pb.ModelInferRequest.InferRequestedOutputTensor, "parameters", 2),
    (pb.ModelInferResponse, "model_name", 1),
    (pb.ModelInferResponse, "model_version", 2),
    (pb.ModelInferResponse, "id", 3),
    (pb.ModelInferResponse, "parameters", 4),
    (pb.ModelInferResponse, "outputs", 5),
    (pb.ModelInferResponse, "raw_output_contents", 6),
    (pb.ModelInferResponse.InferOutputTensor, "contents", 5),
    (pb.ModelStreamInferResponse, "error_message", 1),
    (pb.ModelStreamInferResponse, "infer_response", 2),
    (pb.ModelConfigResponse, "config", 1),
    (pb.StatisticDuration, "count", 1),
    (pb.StatisticDuration, "ns", 2),
    (pb.InferStatistics, "success", 1),
    (pb.InferStatistics, "queue", 3),
    (pb.InferStatistics, "compute_infer", 5),
    (pb.InferStatistics, "cache_miss", 8),
    (pb.InferBatchStatistics, "compute_output", 4),
    (pb.ModelStatistics, "inference_count", 4),
    (pb.ModelStatistics, "execution_count", 5),
    (pb.ModelStatistics, "inference_stats", 6),
    (pb.ModelStatistics, "batch_stats", 7),
    (pb.ModelStatisticsResponse, "model_stats", 1),
    (pb.ModelRepositoryParameter, "bytes_param", 4),
    (pb.RepositoryIndexRequest, "ready", 2),
    (pb.RepositoryIndexResponse.ModelIndex, "state", 3),
    (pb.RepositoryIndexResponse.ModelIndex, "reason", 4),
    (pb.RepositoryModelLoadRequest, "model_name", 2),
    (pb.RepositoryModelLoadRequest, "parameters", 3),
    (pb.RepositoryModelUnloadRequest, "model_name", 2),
    (config_pb.ModelConfig, "name", 1),
    (config_pb.ModelConfig, "platform", 2),
    (config_pb.ModelConfig, "version_policy", 3),
    (config_pb.ModelConfig, "max_batch_size", 4),
    (config_pb.ModelConfig, "input", 5),
    (config_pb.ModelConfig, "output", 6),
    (config_pb.ModelConfig, "instance_group", 7),
    (config_pb.ModelConfig, "default_model_filename", 8),
    (config_pb.ModelConfig, "dynamic_batching", 11),
    (config_pb.ModelConfig, "parameters", 14),
    (config_pb.ModelConfig, "backend", 17),
    (config_pb.ModelConfig, "model_transaction_policy", 19),
    (config_pb.ModelInput, "data_type", 2),
    (config_pb.ModelInput, "format", 3),
    (config_pb.ModelInput, "dims", 4),
    (config_pb.ModelInput, "optional", 8),
    (config_pb.ModelOutput, "dims", 3),
    (config_pb.ModelOutput, "label_filename", 4),
    (config_pb.ModelInstanceGroup, "count", 2),
    (config_pb.ModelInstanceGroup, "gpus", 3),
    (config_pb.ModelInstanceGroup, "kind", 4),
    (config_pb.ModelDynamicBatching, "preferred_batch_size", 1),
    (config_pb.ModelDynamicBatching, "max_queue_delay_microseconds", 2),
    (config_pb.ModelDynamicBatching, "default_queue_policy", 6),
    (config_pb.ModelQueuePolicy, "max_queue_size", 4),
    (config_pb.ModelVersionPolicy, "specific", 3),
]


@pytest.mark.parametrize(
    ("message", "field", "number"), TRITON_FIELD_NUMBERS, ids=lambda x: getattr(x, "__name__", str(x))
)
def test_field_numbers_are_triton_s(message, field: str, number: int) -> None:
    assert message.DESCRIPTOR.fields_by_name[field].number == number


def test_service_paths_and_enums_are_triton_s() -> None:
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert service.full_name == "inference.GRPCInferenceService"
    stream = service.methods_by_name["ModelStreamInfer"]
    assert stream.client_streaming and stream.server_streaming
    assert stream.output_type.full_name == "inference.ModelStreamInferResponse"
    values = {v.name: v.number for v in config_pb.DataType.DESCRIPTOR.values}
    assert values == {
        "TYPE_INVALID": 0,
        "TYPE_BOOL": 1,
        "TYPE_UINT8": 2,
        "TYPE_UINT16": 3,
        "TYPE_UINT32": 4,
        "TYPE_UINT64": 5,
        "TYPE_INT8": 6,
        "TYPE_INT16": 7,
        "TYPE_INT32": 8,
        "TYPE_INT64": 9,
        "TYPE_FP16": 10,
        "TYPE_FP32": 11,
        "TYPE_FP64": 12,
        "TYPE_STRING": 13,
        "TYPE_BF16": 14,
    }
    assert config_pb.ModelInstanceGroup.KIND_CPU == 2 and config_pb.ModelInput.FORMAT_NCHW == 2


def test_our_messages_survive_the_wire() -> None:
    request = pb.ModelInferRequest(model_name="lenet5", model_version="1", id="r")
    tensor, raw = tensors.encode_output("image", np.zeros((1, 1, 32, 32), np.uint8))
    request.inputs.append(_as_input(tensor))
    request.raw_input_contents.append(raw)
    request.parameters["priority"].int64_param = 2
    wire = request.SerializeToString()
    # field 7 (raw_input_contents), wire type 2: tag byte 0x3a then the length 1024 as a varint
    assert b"\x3a\x80\x08" + raw in wire
    assert pb.ModelInferRequest.FromString(wire) == request


# Every field that protos/inference defines, filled, per message; Triton's classes must produce
# the same bytes from the same values and read ours back unchanged.
_PARAMS = {
    "b": {"bool_param": True},
    "i": {"int64_param": -5},
    "s": {"string_param": "text"},
    "d": {"double_param": 0.25},
    "u": {"uint64_param": 2**64 - 1},
}
_CONTENTS = {
    "bool_contents": [True, False, True],
    "int_contents": [-(2**31), 7],
    "int64_contents": [-(2**63), 2**40],
    "uint_contents": [2**32 - 1, 0],
    "uint64_contents": [2**64 - 1],
    "fp32_contents": [1.5, -0.0],
    "fp64_contents": [2.25e300],
    "bytes_contents": [base64.b64encode(b"\x00ab").decode(), ""],
}
_B64 = base64.b64encode(bytes(range(256))).decode()
_DURATION = {"count": 3, "ns": 2**40}
_INFER_RESPONSE = {
    "model_name": "lenet5",
    "model_version": "2",
    "id": "req-9",
    "parameters": _PARAMS,
    "outputs": [
        {
            "name": "logits",
            "datatype": "FP32",
            "shape": [1, -1, 10],
            "parameters": {"binary_data_size": {"int64_param": 40}},
            "contents": _CONTENTS,
        }
    ],
    "raw_output_contents": [_B64, ""],
}
_REPO_PARAMS = {
    "b": {"bool_param": True},
    "i": {"int64_param": -1},
    "s": {"string_param": "x"},
    "f": {"bytes_param": _B64},
}
WIRE_CASES = [
    ("ServerLiveResponse", {"live": True}),
    ("ServerReadyResponse", {"ready": True}),
    ("ModelReadyRequest", {"name": "lenet5", "version": "3"}),
    ("ModelReadyResponse", {"ready": True}),
    ("ServerMetadataResponse", {"name": "convserve", "version": "1.0", "extensions": ["a", "b"]}),
    ("ModelMetadataRequest", {"name": "m", "version": "1"}),
    (
        "ModelMetadataResponse",
        {
            "name": "lenet5",
            "versions": ["1", "2"],
            "platform": "onnxruntime_onnx",
            "inputs": [{"name": "image", "datatype": "UINT8", "shape": [-1, 1, 32, 32]}],
            "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}],
        },
    ),
    (
        "ModelInferRequest",
        {
            "model_name": "lenet5",
            "model_version": "1",
            "id": "req-1",
            "parameters": _PARAMS,
            "inputs": [
                {
                    "name": "image",
                    "datatype": "UINT8",
                    "shape": [1, 1, 32, 32],
                    "parameters": {"shared_memory_region": {"string_param": "r"}},
                    "contents": _CONTENTS,
                }
            ],
            "outputs": [{"name": "logits", "parameters": {"classification": {"int64_param": 3}}}],
            "raw_input_contents": [_B64, base64.b64encode(b"\x01").decode()],
        },
    ),
    ("ModelInferResponse", _INFER_RESPONSE),
    ("ModelStreamInferResponse", {"error_message": "bad input", "infer_response": _INFER_RESPONSE}),
    ("ModelConfigRequest", {"name": "m", "version": "7"}),
    (
        "ModelConfigResponse",
        {
            "config": {
                "name": "lenet5",
                "platform": "onnxruntime_onnx",
                "backend": "onnxruntime",
                "version_policy": {"latest": {"num_versions": 2}},
                "max_batch_size": 64,
                "input": [
                    {
                        "name": "image",
                        "data_type": "TYPE_UINT8",
                        "format": "FORMAT_NCHW",
                        "dims": [1, 32, 32],
                        "optional": True,
                    }
                ],
                "output": [
                    {"name": "logits", "data_type": "TYPE_FP32", "dims": [10], "label_filename": "l.txt"}
                ],
                "instance_group": [{"name": "g", "kind": "KIND_GPU", "count": 2, "gpus": [0, 1]}],
                "default_model_filename": "model.onnx",
                "dynamic_batching": {
                    "preferred_batch_size": [8, 16],
                    "max_queue_delay_microseconds": 500,
                    "preserve_ordering": True,
                    "default_queue_policy": {
                        "timeout_action": "DELAY",
                        "default_timeout_microseconds": 1000,
                        "allow_timeout_override": True,
                        "max_queue_size": 32,
                    },
                },
                "parameters": {"provider": {"string_value": "CUDAExecutionProvider"}},
                "model_transaction_policy": {"decoupled": True},
            }
        },
    ),
    ("ModelVersionPolicy", {"specific": {"versions": [1, 3]}}),
    ("ModelVersionPolicy", {"all": {}}),
    ("ModelInstanceGroup", {"kind": "KIND_MODEL", "count": 1}),
    ("ModelStatisticsRequest", {"name": "m", "version": "1"}),
    (
        "ModelStatisticsResponse",
        {
            "model_stats": [
                {
                    "name": "lenet5",
                    "version": "1",
                    "last_inference": 1_700_000_000_000,
                    "inference_count": 640,
                    "execution_count": 10,
                    "inference_stats": {
                        k: _DURATION
                        for k in (
                            "success",
                            "fail",
                            "queue",
                            "compute_input",
                            "compute_infer",
                            "compute_output",
                            "cache_hit",
                            "cache_miss",
                        )
                    },
                    "batch_stats": [
                        {
                            "batch_size": 64,
                            "compute_input": _DURATION,
                            "compute_infer": _DURATION,
                            "compute_output": _DURATION,
                        }
                    ],
                }
            ]
        },
    ),
    ("RepositoryIndexRequest", {"repository_name": "models", "ready": True}),
    (
        "RepositoryIndexResponse",
        {
            "models": [
                {"name": "lenet5", "version": "1", "state": "READY", "reason": ""},
                {"name": "dcgan", "version": "2", "state": "UNAVAILABLE", "reason": "bad onnx"},
            ]
        },
    ),
    (
        "RepositoryModelLoadRequest",
        {"repository_name": "models", "model_name": "lenet5", "parameters": _REPO_PARAMS},
    ),
    (
        "RepositoryModelUnloadRequest",
        {"repository_name": "models", "model_name": "lenet5", "parameters": _REPO_PARAMS},
    ),
]

# Runs in its own process: tritonclient registers its own `inference` protobuf package, and two
# definitions of inference.* cannot share one process's descriptor pool.
_TRITON_SIDE = r"""
import base64, json, sys
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2, service_pb2

def cls(name):
    return getattr(service_pb2, name, None) or getattr(model_config_pb2, name)

def type_name(f):
    return (f.message_type or f.enum_type).full_name if (f.message_type or f.enum_type) else f.type

def oneof(f):
    return f.containing_oneof.name if f.containing_oneof else None

def describe(d, out):
    out["messages"][d.full_name] = {
        f.name: [f.number, type_name(f), f.is_repeated, oneof(f)]
        for f in d.fields
    }
    for e in d.enum_types:
        out["enums"][e.full_name] = {v.name: v.number for v in e.values}
    for n in d.nested_types:
        describe(n, out)

job = json.load(sys.stdin)
result = {"triton": [], "reparsed": [], "equal": [], "messages": {}, "enums": {}, "methods": {}}
for (name, values), ours in zip(job["cases"], job["ours"]):
    expected = json_format.ParseDict(values, cls(name)())
    result["triton"].append(base64.b64encode(expected.SerializeToString(deterministic=True)).decode())
    theirs = cls(name).FromString(base64.b64decode(ours))
    result["reparsed"].append(base64.b64encode(theirs.SerializeToString(deterministic=True)).decode())
    result["equal"].append(theirs == expected)
for module in (service_pb2, model_config_pb2):
    for d in module.DESCRIPTOR.message_types_by_name.values():
        describe(d, result)
    for e in module.DESCRIPTOR.enum_types_by_name.values():
        result["enums"][e.full_name] = {v.name: v.number for v in e.values}
for m in service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods:
    result["methods"][m.name] = [m.input_type.full_name, m.output_type.full_name,
                                 m.client_streaming, m.server_streaming]
json.dump(result, sys.stdout)
"""


def _ours(name: str):
    return getattr(pb, name, None) or getattr(config_pb, name)


@pytest.fixture(scope="module")
def triton() -> dict:
    """What tritonclient's own generated classes make of WIRE_CASES, and their descriptors."""
    ours = [
        base64.b64encode(json_format.ParseDict(v, _ours(n)()).SerializeToString(deterministic=True)).decode()
        for n, v in WIRE_CASES
    ]
    done = subprocess.run(
        [sys.executable, "-c", _TRITON_SIDE],
        input=json.dumps({"cases": WIRE_CASES, "ours": ours}),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize(("index", "name"), [(i, n) for i, (n, _) in enumerate(WIRE_CASES)])
def test_tritonclient_and_we_write_the_same_bytes_and_read_each_other(
    triton: dict, index: int, name: str
) -> None:
    values = WIRE_CASES[index][1]
    ours = json_format.ParseDict(values, _ours(name)())
    ours_bytes = ours.SerializeToString(deterministic=True)
    theirs_bytes = base64.b64decode(triton["triton"][index])
    # Triton -> us: every value arrives, nothing is left over as an unknown field.
    parsed = _ours(name).FromString(theirs_bytes)
    assert parsed == ours
    assert parsed.SerializeToString(deterministic=True) == theirs_bytes
    assert json_format.MessageToDict(parsed, preserving_proto_field_name=True) == json_format.MessageToDict(
        ours, preserving_proto_field_name=True
    )
    # Us -> Triton: tritonclient reads our bytes as the same message.
    assert triton["equal"][index]
    assert base64.b64decode(triton["reparsed"][index]) == ours_bytes
    assert ours_bytes == theirs_bytes


def _describe_ours() -> tuple[dict, dict]:
    messages: dict = {}
    enums: dict = {}

    def walk(d) -> None:
        messages[d.full_name] = {
            f.name: [
                f.number,
                (f.message_type or f.enum_type).full_name if (f.message_type or f.enum_type) else f.type,
                f.is_repeated,
                f.containing_oneof.name if f.containing_oneof else None,
            ]
            for f in d.fields
        }
        for e in d.enum_types:
            enums[e.full_name] = {v.name: v.number for v in e.values}
        for n in d.nested_types:
            walk(n)

    for module in (pb, config_pb):
        for d in module.DESCRIPTOR.message_types_by_name.values():
            walk(d)
        for e in module.DESCRIPTOR.enum_types_by_name.values():
            enums[e.full_name] = {v.name: v.number for v in e.values}
    return messages, enums


def test_every_field_enum_and_method_we_define_is_triton_s(triton: dict) -> None:
    messages, enums = _describe_ours()
    for message, fields in messages.items():
        assert message in triton["messages"], f"{message} is not in Triton's protos"
        for field, spec in fields.items():
            assert triton["messages"][message].get(field) == spec, f"{message}.{field}: {spec}"
    for enum, values in enums.items():
        for value, number in values.items():
            assert triton["enums"][enum].get(value) == number, f"{enum}.{value}"
    for method in pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods:
        assert triton["methods"][method.name] == [
            method.input_type.full_name,
            method.output_type.full_name,
            method.client_streaming,
            method.server_streaming,
        ]


# tritonclient's own tensor code: InferInput.set_data_from_numpy builds a request, InferResult.as_numpy
# reads a response. Also in its own process, for the reason above.
_TRITON_CLIENT_SIDE = r"""
import base64, io, json, sys
import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.grpc import _utils, service_pb2

def load(text):
    return np.load(io.BytesIO(base64.b64decode(text)), allow_pickle=True)

def dump(array):
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return base64.b64encode(buffer.getvalue()).decode()

job = json.load(sys.stdin)
inputs = []
for name, datatype, text in job["arrays"]:
    infer_input = grpcclient.InferInput(name, list(load(text).shape), datatype)
    infer_input.set_data_from_numpy(load(text))
    inputs.append(infer_input)
request = _utils._get_inference_request(
    model_name="lenet5", inputs=inputs, model_version="2", request_id="r1",
    outputs=[grpcclient.InferRequestedOutput("y")], sequence_id=0, sequence_start=False,
    sequence_end=False, priority=3, timeout=None, parameters=None,
)
result = grpcclient.InferResult(service_pb2.ModelInferResponse.FromString(base64.b64decode(job["response"])))
json.dump({
    "request": base64.b64encode(request.SerializeToString()).decode(),
    "outputs": {name: dump(result.as_numpy(name)) for name, _, _ in job["arrays"]},
}, sys.stdout)
"""


def _npy(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return base64.b64encode(buffer.getvalue()).decode()


def test_tritonclient_tensors_decode_and_ours_read_back() -> None:
    arrays = {f"in_{name.lower()}": (name, _sample(name, (2, 2, 3))) for name in tensors.SUPPORTED}
    response = pb.ModelInferResponse(model_name="lenet5", model_version="2", id="r1")
    for key, (_, array) in arrays.items():
        tensor, raw = tensors.encode_output(key, array)
        response.outputs.append(tensor)
        response.raw_output_contents.append(raw)
    job = {
        "arrays": [[key, name, _npy(array)] for key, (name, array) in arrays.items()],
        "response": base64.b64encode(response.SerializeToString()).decode(),
    }
    done = subprocess.run(
        [sys.executable, "-c", _TRITON_CLIENT_SIDE],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)

    request = pb.ModelInferRequest.FromString(base64.b64decode(result["request"]))
    assert (request.model_name, request.model_version, request.id) == ("lenet5", "2", "r1")
    assert request.parameters["priority"].uint64_param == 3  # tritonclient sends priority as uint64
    assert [o.name for o in request.outputs] == ["y"]
    decoded = tensors.decode_inputs(request)
    assert list(decoded) == list(arrays)
    for key, (name, array) in arrays.items():
        assert request.inputs[list(arrays).index(key)].datatype == name
        _assert_same(decoded[key], array, name)

    for key, (name, array) in arrays.items():
        theirs = np.load(io.BytesIO(base64.b64decode(result["outputs"][key])), allow_pickle=True)
        assert theirs.shape == array.shape
        if name == "BYTES":
            assert theirs.ravel().tolist() == array.ravel().tolist()
        else:
            assert theirs.dtype == array.dtype
            np.testing.assert_array_equal(theirs, array)
