"""KServe v2 tensors <-> numpy arrays: the datatype table and the codec, numpy only.

A tensor on the wire is a name, a datatype string ("UINT8", "FP32", "BYTES", ...), a shape and
its elements, either as raw little-endian bytes (ModelInferRequest.raw_input_contents,
ModelInferResponse.raw_output_contents) or as typed repeated values (InferTensorContents). A
BYTES element in raw form is a 4-byte little-endian length followed by that many bytes.

Everything a request claims is checked by arithmetic before memory is allocated for it: a shape
that promises a billion elements with ten bytes of data is rejected at once.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from service._proto.inference import grpc_predict_v2_pb2 as pb
from service._proto.inference import model_config_pb2 as config_pb
from service.domain import InputTensor, ParameterValue
from service.errors import InvalidArgument, clip, clip_list

# Every element costs at least one byte on the wire, so the largest gRPC message (64 MiB by
# default) never carries more elements than this; servers pass their own message limit.
DEFAULT_MAX_ELEMENTS = 64 * 1024 * 1024

_LENGTH = struct.Struct("<I")


@dataclass(frozen=True)
class Datatype:
    """One KServe datatype and its names elsewhere."""

    name: str  # KServe datatype string, e.g. "UINT8"
    dtype: np.dtype  # numpy dtype, little-endian; object (elements are bytes) for BYTES
    config: int  # Triton ModelConfig DataType value, e.g. TYPE_UINT8
    onnx: str  # onnxruntime type string, e.g. "tensor(uint8)"
    contents: str | None  # the InferTensorContents field that carries it; None: raw only


def _dt(name: str, dtype: str, config: int, onnx: str, contents: str | None) -> Datatype:
    return Datatype(name, np.dtype(dtype), config, f"tensor({onnx})", contents)


DATATYPES: dict[str, Datatype] = {
    d.name: d
    for d in (
        _dt("BOOL", "|b1", config_pb.TYPE_BOOL, "bool", "bool_contents"),
        _dt("UINT8", "|u1", config_pb.TYPE_UINT8, "uint8", "uint_contents"),
        _dt("UINT16", "<u2", config_pb.TYPE_UINT16, "uint16", "uint_contents"),
        _dt("UINT32", "<u4", config_pb.TYPE_UINT32, "uint32", "uint_contents"),
        _dt("UINT64", "<u8", config_pb.TYPE_UINT64, "uint64", "uint64_contents"),
        _dt("INT8", "|i1", config_pb.TYPE_INT8, "int8", "int_contents"),
        _dt("INT16", "<i2", config_pb.TYPE_INT16, "int16", "int_contents"),
        _dt("INT32", "<i4", config_pb.TYPE_INT32, "int32", "int_contents"),
        _dt("INT64", "<i8", config_pb.TYPE_INT64, "int64", "int64_contents"),
        _dt("FP16", "<f2", config_pb.TYPE_FP16, "float16", None),
        _dt("FP32", "<f4", config_pb.TYPE_FP32, "float", "fp32_contents"),
        _dt("FP64", "<f8", config_pb.TYPE_FP64, "double", "fp64_contents"),
        _dt("BYTES", "O", config_pb.TYPE_STRING, "string", "bytes_contents"),
    )
}
SUPPORTED = tuple(DATATYPES)

# What numpy type each InferTensorContents field decodes to before narrowing to the datatype.
_CONTENTS_DTYPE = {
    "bool_contents": np.dtype(np.bool_),
    "int_contents": np.dtype(np.int32),
    "int64_contents": np.dtype(np.int64),
    "uint_contents": np.dtype(np.uint32),
    "uint64_contents": np.dtype(np.uint64),
    "fp32_contents": np.dtype(np.float32),
    "fp64_contents": np.dtype(np.float64),
}
_BY_KIND_SIZE = {(d.dtype.kind, d.dtype.itemsize): d.name for d in DATATYPES.values() if d.name != "BYTES"}
_BY_ONNX = {d.onnx: d.name for d in DATATYPES.values()}


def datatype(name: str, *, what: str = "tensor") -> Datatype:
    """The Datatype for a KServe datatype string; InvalidArgument naming the supported ones."""
    try:
        return DATATYPES[name]
    except KeyError:
        raise InvalidArgument(
            f"{what}: unknown datatype {clip(name)}; supported: {', '.join(SUPPORTED)}"
        ) from None


def datatype_of(dtype: np.dtype | type) -> str:
    """The KServe datatype string of a numpy dtype (either byte order; str/bytes/object -> BYTES)."""
    dtype = np.dtype(dtype)
    if dtype.kind in "OSU":
        return "BYTES"
    try:
        return _BY_KIND_SIZE[(dtype.kind, dtype.itemsize)]
    except KeyError:
        raise ValueError(f"numpy dtype {dtype} has no KServe datatype") from None


def datatype_from_onnx(type_str: str) -> str:
    """The KServe datatype string of an onnxruntime type string, e.g. "tensor(float)" -> "FP32"."""
    try:
        return _BY_ONNX[type_str]
    except KeyError:
        raise ValueError(
            f"onnxruntime type {type_str!r} has no KServe datatype; supported: {', '.join(_BY_ONNX)}"
        ) from None


def config_datatype(name: str) -> int:
    """The Triton ModelConfig DataType value (TYPE_UINT8, ...) of a KServe datatype string."""
    return datatype(name).config


def element_count(
    shape: Sequence[int], *, max_elements: int = DEFAULT_MAX_ELEMENTS, what: str = "tensor"
) -> int:
    """The number of elements a shape holds, checked without allocating anything.

    Every dimension must be a non-negative integer and the count at most max_elements (a single
    dimension too, even where another is zero), else InvalidArgument.
    """
    dims = list(shape)
    for dim in dims:
        if dim < 0:
            raise InvalidArgument(
                f"{what}: shape {clip_list(dims)} has a negative dimension; dimensions must be >= 0"
            )
        if dim > max_elements:
            raise InvalidArgument(
                f"{what}: shape {clip_list(dims)} has a dimension of {dim}, "
                f"more than the {max_elements} elements allowed"
            )
    if 0 in dims:
        return 0
    count = 1
    for dim in dims:
        count *= dim
        if count > max_elements:
            raise InvalidArgument(
                f"{what}: shape {clip_list(dims)} holds more than the {max_elements} elements allowed"
            )
    return count


def decode_tensor(tensor: InputTensor, *, max_elements: int = DEFAULT_MAX_ELEMENTS) -> np.ndarray:
    """One request input as a numpy array of its shape.

    Raw numeric data is wrapped without a copy: the array is read-only and does not own its
    memory (copy it before writing). BYTES gives an object array of bytes. Any mismatch between
    datatype, shape and data raises InvalidArgument naming the input.
    """
    what = f"input {clip(tensor.name)}"
    return _decode(tensor.datatype, list(tensor.shape), tensor.raw, tensor.typed, max_elements, what)


def decode_tensors(
    inputs: Sequence[InputTensor], *, max_elements: int = DEFAULT_MAX_ELEMENTS
) -> dict[str, np.ndarray]:
    """Every input of a request by name."""
    arrays: dict[str, np.ndarray] = {}
    for tensor in inputs:
        if tensor.name in arrays:
            raise InvalidArgument(f"input {clip(tensor.name)} appears more than once")
        arrays[tensor.name] = decode_tensor(tensor, max_elements=max_elements)
    return arrays


def decode_input(
    tensor: pb.ModelInferRequest.InferInputTensor,
    raw: bytes | None,
    *,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> np.ndarray:
    """One wire input (with its raw_input_contents entry, or None) as a numpy array; as decode_tensor."""
    what = f"input {clip(tensor.name)}"
    return _decode(tensor.datatype, list(tensor.shape), raw, typed_contents(tensor), max_elements, what)


def decode_inputs(
    request: pb.ModelInferRequest, *, max_elements: int = DEFAULT_MAX_ELEMENTS
) -> dict[str, np.ndarray]:
    """Every input of a wire request by name; as decode_tensors."""
    return decode_tensors(input_tensors(request), max_elements=max_elements)


def decode_output(
    tensor: pb.ModelInferResponse.InferOutputTensor,
    raw: bytes | None,
    *,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> np.ndarray:
    """One response output as a numpy array (for clients); as decode_input."""
    typed = typed_contents(tensor)
    what = f"output {clip(tensor.name)}"
    return _decode(tensor.datatype, list(tensor.shape), raw, typed, max_elements, what)


def typed_contents(
    tensor: pb.ModelInferRequest.InferInputTensor | pb.ModelInferResponse.InferOutputTensor,
) -> Sequence[object] | None:
    """The values of a wire tensor's typed-contents field for its datatype; None without contents.

    A datatype without a typed field (FP16), or an unknown one, gives an empty sequence: decoding
    then says what is wrong.
    """
    if not tensor.HasField("contents"):
        return None
    kind = DATATYPES.get(tensor.datatype)
    if kind is None or kind.contents is None:
        return ()
    return getattr(tensor.contents, kind.contents)


def input_tensors(request: pb.ModelInferRequest) -> list[InputTensor]:
    """A ModelInferRequest's inputs, pairing raw_input_contents with inputs in order."""
    raws = request.raw_input_contents
    if raws and len(raws) != len(request.inputs):
        raise InvalidArgument(
            f"request has {len(raws)} raw_input_contents for {len(request.inputs)} inputs; "
            "send one per input, in the order of inputs"
        )
    return [
        InputTensor(
            name=tensor.name,
            datatype=tensor.datatype,
            shape=tensor.shape,
            raw=raws[i] if raws else None,
            typed=typed_contents(tensor),
            parameters=parameters(tensor.parameters),
        )
        for i, tensor in enumerate(request.inputs)
    ]


def parameters(wire: Mapping[str, pb.InferParameter]) -> dict[str, ParameterValue]:
    """A protobuf parameter map as plain values."""
    if not wire:  # the common case, at a fraction of the cost of iterating
        return {}
    values: dict[str, ParameterValue] = {}
    for name, parameter in wire.items():
        which = parameter.WhichOneof("parameter_choice")
        values[name] = getattr(parameter, which) if which is not None else ""
    return values


def encode_output(name: str, array: np.ndarray) -> tuple[pb.ModelInferResponse.InferOutputTensor, bytes]:
    """An output's metadata and its raw little-endian bytes (BYTES as length-prefixed elements)."""
    name_of_type, raw = encode_raw(array)
    return pb.ModelInferResponse.InferOutputTensor(name=name, datatype=name_of_type, shape=array.shape), raw


def encode_raw(array: np.ndarray) -> tuple[str, bytes]:
    """An array's KServe datatype and raw little-endian bytes (BYTES as length-prefixed elements)."""
    name = datatype_of(array.dtype)
    if name == "BYTES":
        return name, encode_bytes(array.ravel())
    return name, np.ascontiguousarray(array, dtype=DATATYPES[name].dtype).tobytes()


def encode_typed(array: np.ndarray) -> pb.InferTensorContents:
    """An array's elements as typed InferTensorContents (FP16 has no typed form: ValueError)."""
    array = np.asarray(array)
    kind = DATATYPES[datatype_of(array.dtype)]
    if kind.contents is None:
        raise ValueError(f"{kind.name} has no typed contents field; send it raw")
    flat = array.ravel()
    values = [_element_bytes(x) for x in flat] if kind.name == "BYTES" else flat.tolist()
    contents = pb.InferTensorContents()
    getattr(contents, kind.contents).extend(values)
    return contents


def encode_bytes(elements: Iterable[object]) -> bytes:
    """BYTES elements in raw form: each a 4-byte little-endian length and its bytes (str as UTF-8)."""
    parts = []
    for element in elements:
        data = _element_bytes(element)
        parts.append(_LENGTH.pack(len(data)))
        parts.append(data)
    return b"".join(parts)


def _element_bytes(element: object) -> bytes:
    if isinstance(element, str):
        return element.encode()
    if isinstance(element, bytes | bytearray | memoryview):
        return bytes(element)
    raise ValueError(f"a BYTES element must be bytes or str, not {type(element).__name__}")


def _decode(
    datatype_name: str,
    shape: list[int],
    raw: bytes | None,
    typed: Sequence[object] | None,
    max_elements: int,
    what: str,
) -> np.ndarray:
    kind = datatype(datatype_name, what=what)
    count = element_count(shape, max_elements=max_elements, what=what)
    if raw is not None:
        if typed is not None:
            raise InvalidArgument(f"{what}: has both typed contents and raw contents; send one")
        if kind.name == "BYTES":
            return _decode_raw_bytes(raw, shape, count, what)
        expected = count * kind.dtype.itemsize
        if len(raw) != expected:
            raise InvalidArgument(
                f"{what}: shape {clip_list(shape)} of {kind.name} needs {expected} bytes, "
                f"got {len(raw)} bytes"
            )
        if count == 0:
            return np.empty(shape, dtype=kind.dtype)
        if kind.name == "BOOL" and np.frombuffer(raw, dtype=np.uint8).max() > 1:
            raise InvalidArgument(f"{what}: BOOL raw data must be bytes 0 or 1")
        return np.frombuffer(raw, dtype=kind.dtype, count=count).reshape(shape)
    return _decode_typed(() if typed is None else typed, kind, shape, count, what)


def _decode_raw_bytes(raw: bytes, shape: list[int], count: int, what: str) -> np.ndarray:
    # Each element needs at least its 4-byte length, so this bounds count by the data received.
    if len(raw) < _LENGTH.size * count:
        raise InvalidArgument(
            f"{what}: shape {clip_list(shape)} of BYTES needs at least {_LENGTH.size * count} bytes "
            f"(a 4-byte length per element), got {len(raw)} bytes"
        )
    out = np.empty(count, dtype=object)
    view = memoryview(raw)
    offset = 0
    for i in range(count):
        if offset + _LENGTH.size > len(raw):
            raise InvalidArgument(
                f"{what}: raw BYTES data ends inside the length of element {i} of {count} "
                f"(shape {clip_list(shape)}); each element is a 4-byte little-endian length and its bytes"
            )
        (length,) = _LENGTH.unpack_from(raw, offset)
        offset += _LENGTH.size
        if offset + length > len(raw):
            raise InvalidArgument(
                f"{what}: BYTES element {i} claims {length} bytes, only {len(raw) - offset} remain"
            )
        out[i] = bytes(view[offset : offset + length])
        offset += length
    if offset != len(raw):
        raise InvalidArgument(
            f"{what}: shape {clip_list(shape)} of BYTES has {count} elements, but {len(raw) - offset} bytes "
            "follow the last one"
        )
    return out.reshape(shape)


def _decode_typed(
    values: Sequence[object], kind: Datatype, shape: list[int], count: int, what: str
) -> np.ndarray:
    if kind.contents is None:
        raise InvalidArgument(f"{what}: {kind.name} has no typed contents field; send it as raw contents")
    if len(values) != count:
        raise InvalidArgument(
            f"{what}: shape {clip_list(shape)} of {kind.name} needs {count} values in {kind.contents}, "
            f"got {len(values)}"
        )
    if kind.name == "BYTES":
        out = np.empty(count, dtype=object)
        for i, value in enumerate(values):
            out[i] = value
        return out.reshape(shape)
    wide = np.fromiter(values, dtype=_CONTENTS_DTYPE[kind.contents], count=count)
    if wide.dtype != kind.dtype and count:
        info = np.iinfo(kind.dtype)
        low, high = wide.min(), wide.max()
        if low < info.min or high > info.max:
            raise InvalidArgument(
                f"{what}: {kind.contents} holds {low if low < info.min else high}, "
                f"out of the range of {kind.name} [{info.min}, {info.max}]"
            )
    return wide.astype(kind.dtype, copy=False).reshape(shape)
