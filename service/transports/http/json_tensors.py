"""KServe v2 JSON bodies to the data plane's request: parsing, type and range checks, tensors.

Kept apart from the routes, with light imports (no aiohttp, no data plane), because a large body
is decoded in another process (see `service/codecs/cost.py`, `Codec.JSON`): `json.loads` and
`np.asarray` over nested lists hold the GIL for their whole run, so a thread would still stall the
event loop. What comes back is small to unpickle: raw tensor bytes, never the parsed lists.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from service.codecs import tensors
from service.domain import InferRequest, InputTensor, OutputRequest, ParameterValue
from service.errors import InvalidArgument, clip, clip_list

#: The range of integers in query parameters (int64, as on gRPC).
INT64 = (-(2**63), 2**63 - 1)


def whole_number(text: str, what: str) -> int:
    """A decimal integer in int64's range, else InvalidArgument."""
    try:
        value = int(text)
    except ValueError:
        raise InvalidArgument(f"{what} must be an integer, got {clip(text)}") from None
    if not INT64[0] <= value <= INT64[1]:
        raise InvalidArgument(f"{what} must be a 64-bit integer, got {clip(text)}")
    return value


def parse_json(raw: bytes) -> Any:
    """A request body's JSON; anything json.loads refuses is the client's mistake (InvalidArgument)."""
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidArgument(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidArgument("request body is nested too deeply") from None
    except ValueError:  # not a JSONDecodeError: an integer longer than Python converts (since 3.11)
        raise InvalidArgument(
            f"request body holds an integer of more than {sys.get_int_max_str_digits()} digits"
        ) from None


def parameters(value: Any, where: str) -> dict[str, ParameterValue]:
    """A JSON `parameters` object: names to bool, number or string values."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidArgument(f"{where}: parameters must be a JSON object")
    for name, item in value.items():
        if not isinstance(item, bool | int | float | str):
            raise InvalidArgument(f"{where}: parameter {clip(str(name))} must be a boolean, number or string")
    return dict(value)


class BinaryOutputs:
    """Which outputs a request wants as binary data."""

    def __init__(self, default: bool, chosen: dict[str, bool]) -> None:
        self._default = default
        self._chosen = chosen

    def __contains__(self, name: object) -> bool:
        return self._chosen.get(name, self._default)  # type: ignore[call-overload]


@dataclass(frozen=True)
class Decoded:
    """A decoded JSON header: the request, its inputs' binary data still to be cut from the body
    (`slices`: input index, start, end), and which outputs go as binary data."""

    request: InferRequest
    slices: list[tuple[int, int, int]]
    binary: BinaryOutputs

    def with_binary_data(self, body: bytes) -> InferRequest:
        """The request with each binary input's bytes cut from the whole body."""
        if not self.slices:
            return self.request
        inputs = list(self.request.inputs)
        for index, start, end in self.slices:
            inputs[index] = replace(inputs[index], raw=body[start:end])
        return replace(self.request, inputs=inputs)


def decode_header(header: bytes, body_length: int, name: str, version: str) -> Decoded:
    """The JSON header of an infer body (all of it, or what precedes binary data) as the data
    plane's request, with raw bytes for every JSON input. Costly for a large header: see above."""
    parsed = parse_json(header)
    if not isinstance(parsed, dict) or not isinstance(parsed.get("inputs"), list):
        raise InvalidArgument('request body must be a JSON object with an "inputs" list')
    max_elements = len(header) // 2  # every JSON element costs at least two bytes ("0,")
    inputs, slices, offset = [], [], len(header)
    for item in parsed["inputs"]:
        tensor, size = _input(item, max_elements)
        if size is not None:
            if offset + size > body_length:
                raise InvalidArgument(
                    f"input {clip(tensor.name)}: binary_data_size {size} does not fit the body"
                )
            slices.append((len(inputs), offset, offset + size))
            offset += size
        inputs.append(tensor)
    if offset != body_length:
        raise InvalidArgument(
            f"{body_length - offset} bytes of binary data follow the inputs that claim none"
        )
    given = parameters(parsed.get("parameters"), "request")
    requested = parsed.get("outputs", [])  # not `or []`: {} or 0 must be refused, not read as none
    if not isinstance(requested, list) or not all(isinstance(o, dict) for o in requested):
        raise InvalidArgument('"outputs" must be a list of JSON objects, each with a "name"')
    outputs = [
        OutputRequest(
            _text_field(o, "name"), parameters(o.get("parameters"), f"output {clip(o.get('name'))}")
        )
        for o in requested
    ]
    default = bool(given.get("binary_data_output", False))
    # an output's own binary_data decides for it; binary_data_output for every other one
    binary = {o.name: bool(o.parameters.get("binary_data", default)) for o in outputs}
    request = InferRequest(
        model=name,
        version=version,
        inputs=inputs,
        outputs=outputs,
        id=_text_field(parsed, "id"),
        parameters=given,
    )
    return Decoded(request, slices, BinaryOutputs(default, binary))


def _text_field(item: dict[str, Any], key: str) -> str:
    """A JSON object's string field ("" when absent); anything else is the client's mistake."""
    value = item.get(key, "")
    if not isinstance(value, str):
        raise InvalidArgument(f'"{key}" must be a string, got a JSON {type(value).__name__}')
    return value


def _input(item: Any, max_elements: int) -> tuple[InputTensor, int | None]:
    """One JSON input: the tensor (raw bytes from its JSON data, or none yet) and its binary data's
    size when its data follows the JSON."""
    if not isinstance(item, dict):
        raise InvalidArgument("each input must be a JSON object with name, shape, datatype and data")
    name, datatype, shape = _text_field(item, "name"), _text_field(item, "datatype"), item.get("shape")
    what = f"input {clip(name)}"
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise InvalidArgument(f"{what}: shape must be a list of integers")
    given = parameters(item.get("parameters"), what)
    size = given.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidArgument(f"{what}: binary_data_size {clip(size)} does not fit the body")
        return InputTensor(name, datatype, shape, raw=b"", parameters=given), size
    kind = tensors.datatype(datatype, what=what)
    count = tensors.element_count(shape, max_elements=max_elements, what=what)
    data = item.get("data")
    if data is None:
        raise InvalidArgument(f"{what} has neither data nor binary_data_size")
    _check_nesting(data, len(shape), what)  # before any conversion: numpy would follow any nesting
    if kind.name == "BYTES":
        try:
            elements = list(np.ravel(np.array(data, dtype=object)))
            raw = tensors.encode_bytes(elements)
        except (ValueError, TypeError):
            raise InvalidArgument(
                f"{what}: BYTES data must be a list of strings, nested as its shape"
            ) from None
        found = len(elements)
    else:
        array = _numbers(data, kind.dtype, datatype, what)
        raw, found = array.tobytes(), array.size
    if found != count:
        raise InvalidArgument(f"{what}: shape {clip_list(shape)} needs {count} elements, data has {found}")
    return InputTensor(name, datatype, shape, raw=raw, parameters=given), None


def _check_nesting(data: Any, dimensions: int, what: str) -> None:
    """JSON `data` is flat (a list of values) or nested exactly as deep as the shape; its first
    path down tells which (numpy refuses ragged lists itself)."""
    if not isinstance(data, list):
        return  # one value: numpy takes it as it is
    depth, inner = 1, data
    while inner and isinstance(inner[0], list):
        depth, inner = depth + 1, inner[0]
        if depth > max(dimensions, 1):
            raise InvalidArgument(
                f"{what}: data is nested deeper than its shape's {dimensions} dimensions; "
                "send it flat or nested as the shape"
            )


def _numbers(data: Any, dtype: np.dtype, datatype: str, what: str) -> np.ndarray:
    """JSON numbers as a flat array of `dtype`; integer and BOOL tensors take whole numbers within
    their range only (numpy would wrap 300 into a UINT8 silently). Anything but numbers (and
    booleans) is refused: numpy would turn null into NaN and "1.5" into 1.5 without a word."""
    try:
        given = np.asarray(data)
    except (TypeError, ValueError, OverflowError, RecursionError):
        raise InvalidArgument(f"{what}: data is not a list of {datatype} numbers") from None
    if given.dtype.kind in "SU" or (given.dtype.kind == "O" and any(v is None for v in given.flat)):
        raise InvalidArgument(f"{what}: {datatype} data must be numbers, not null or text")
    if dtype.kind in "iub" and given.size:
        if given.dtype.kind not in "iub":
            got = given.dtype.name
            raise InvalidArgument(f"{what}: {datatype} data must be whole numbers, got {got} values")
        low, high = (0, 1) if dtype == np.bool_ else (np.iinfo(dtype).min, np.iinfo(dtype).max)
        smallest, largest = given.min(), given.max()
        if smallest < low or largest > high:
            outside = smallest if smallest < low else largest
            raise InvalidArgument(f"{what}: {outside} is outside the range of {datatype} ({low}..{high})")
    try:
        return np.asarray(given, dtype=dtype).ravel()
    except (TypeError, ValueError, OverflowError):
        raise InvalidArgument(f"{what}: data is not a list of {datatype} numbers") from None


def decode_latents(raw: bytes) -> np.ndarray:
    """A generate body, `{"latents": [[z, ...], ...]}`, as float32 (count, latent size).

    Kept here for the same reason as `decode_header`: a large body is parsed in another process.
    Values must be JSON numbers; a value float32 cannot hold becomes infinite, which the
    generator refuses with the others that are not finite.
    """
    body = parse_json(raw)
    if not isinstance(body, dict) or set(body) != {"latents"}:
        raise InvalidArgument('the body must be a JSON object with one key, "latents"')
    rows = body["latents"]
    problem = "latents must be a non-empty list of equally long lists of numbers, e.g. [[0.1, -1.2, ...]]"
    if not isinstance(rows, list) or not rows or not all(isinstance(row, list) for row in rows):
        raise InvalidArgument(problem)
    width = len(rows[0])
    for row in rows:
        if len(row) != width or not all(type(value) in (int, float) for value in row):
            raise InvalidArgument(problem)
    try:
        with np.errstate(over="ignore"):
            return np.asarray(rows, dtype=np.float32).reshape(len(rows), width)
    except OverflowError:  # an integer beyond any float
        raise InvalidArgument("latents hold a number too large for float32") from None
