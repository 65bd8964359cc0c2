"""Which request parameters the server honours, decided once for both transports.

KServe v2 lets a request, each input and each output carry parameters. A parameter this server
does not act on is refused with a message that names it, never ignored: a client that asks for
shared memory or a sequence must learn at once that it did not get it.

- request: `timeout` (µs, as Triton: the request fails with DEADLINE_EXCEEDED if it cannot start
  in time), `binary_data_output` (HTTP: answer every output as binary data; gRPC outputs are
  always raw bytes) and `triton_enable_empty_final_response` (perf_analyzer sends it on streams:
  every request gets exactly one response, which is its final one, so there is nothing to send);
- input: `binary_data_size` (HTTP: the input's bytes follow the JSON header);
- output: `binary_data` (HTTP: this output as binary data, or not) and `classification` (a whole
  number k >= 1: Triton's classification extension, the output's top k as "score:index:label"
  strings; see service/kinds/tensor.py);
- load: none (no config or file overrides from the network); unload: `unload_dependents` (a bool;
  a model's parts, e.g. a captioner's encoder and decoder, are always unloaded with it).
"""

from __future__ import annotations

from collections.abc import Iterable

from service.domain import InferRequest, Parameters
from service.errors import InvalidArgument

REQUEST = frozenset({"timeout", "binary_data_output", "triton_enable_empty_final_response"})
INPUT = frozenset({"binary_data_size"})
OUTPUT = frozenset({"binary_data", "classification"})
UNLOAD = frozenset({"unload_dependents"})

_WHY = {
    "shared_memory_region": "shared memory is not supported; send the tensor data in the request",
    "shared_memory_byte_size": "shared memory is not supported; send the tensor data in the request",
    "shared_memory_offset": "shared memory is not supported; send the tensor data in the request",
    "priority": "priorities are not supported: each model has one queue, first come first served",
    "sequence_id": "sequences are not supported: every request stands alone",
    "sequence_start": "sequences are not supported: every request stands alone",
    "sequence_end": "sequences are not supported: every request stands alone",
}


def check_infer_parameters(request: InferRequest) -> int | None:
    """Refuse parameters the server does not honour; returns the request's `timeout` (µs) if set."""
    _refuse_unknown(request.parameters, REQUEST, "request")
    for tensor in request.inputs:
        if tensor.parameters:
            _refuse_unknown(tensor.parameters, INPUT, f"input {tensor.name[:64]!r}")
    for output in request.outputs:
        if output.parameters:
            _refuse_unknown(output.parameters, OUTPUT, f"output {output.name[:64]!r}")
        classes = output.parameters.get("classification")
        if classes is not None and (isinstance(classes, bool) or not isinstance(classes, int) or classes < 1):
            raise InvalidArgument(f"output {output.name[:64]!r}: classification must be a whole number >= 1")
    timeout = request.parameters.get("timeout")
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, int) or timeout < 0:
        raise InvalidArgument("parameter 'timeout' must be a whole number of microseconds >= 0")
    return timeout


def check_load_parameters(parameters: Parameters) -> None:
    """Loading takes the model's own files only: Triton's "config" and "file:<path>" are refused."""
    if parameters:
        names = sorted(str(name)[:64] for name in parameters)[:8]  # never echo their values
        raise InvalidArgument(f"repository parameters are not supported (got {names})")


def check_unload_parameters(parameters: Parameters) -> None:
    _refuse_unknown(parameters, UNLOAD, "unload")
    value = parameters.get("unload_dependents")
    if value is not None and not isinstance(value, bool):
        raise InvalidArgument("parameter 'unload_dependents' must be true or false")


def _refuse_unknown(parameters: Parameters, honoured: Iterable[str], where: str) -> None:
    if not parameters:  # the common case
        return
    unknown = sorted(str(name)[:64] for name in parameters if name not in honoured)
    if not unknown:
        return
    reasons = sorted({_WHY[name] for name in unknown if name in _WHY})
    because = "; ".join(reasons) if reasons else f"supported here: {', '.join(sorted(honoured))}"
    shown = unknown[:8]
    raise InvalidArgument(f"{where} parameter(s) {shown} not supported: {because}")
