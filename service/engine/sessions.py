"""onnxruntime sessions: provider choice, detection of the provider really obtained, warm-up.

onnxruntime-gpu asked for CUDA on a machine without it falls back to the CPU with only a log
line; `session.get_providers()` is the truth, so that is what we record and report.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from service.errors import InvalidArgument

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
#: How a version that cannot run on CUDA under require_gpu fails; readiness looks for it.
REQUIRE_GPU_FAILURE = "require_gpu is set"
CPU = "CPUExecutionProvider"


class ModelLoadError(Exception):
    """A model version could not be brought to READY; the message is its reason."""


@cache
def onnxruntime() -> ModuleType:
    """Import onnxruntime once, saying which extra to install when it is missing."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ModelLoadError(
            "onnxruntime is not installed: pip install 'convserve[gpu]' (NVIDIA GPU, falls back to CPU) "
            "or 'convserve[cpu]' (CPU only)"
        ) from exc
    # onnxruntime prints its own coloured lines to stderr, e.g. why CUDA could not be used; keep
    # them out of the structured log unless debugging.
    ort.set_default_logger_severity(2 if log.isEnabledFor(logging.DEBUG) else 4)
    # A server sends nothing anywhere, and recent releases would also write a device id under
    # $HOME, which fails (with a warning) on a read-only root filesystem.
    if hasattr(ort, "disable_telemetry_events"):
        ort.disable_telemetry_events()
    if CUDA in ort.get_available_providers() and importlib.util.find_spec("nvidia.cudnn") is not None:
        # CUDA and cuDNN came from pip (the `cuda` extra): load them before the first session. (Other
        # nvidia-* wheels alone, such as the CUDA runtime perf_analyzer needs, are not enough.)
        ort.preload_dlls()
    return ort


#: (asked, got) fallbacks already noted once for this process.
_noted_fallbacks: set[tuple[str, str]] = set()


def _report_fallback(asked: str, got: str, path: Path, explicit: bool) -> None:
    """A session that did not get its first provider: a warning per graph when the operator asked for
    that provider, else one note per process (onnxruntime-gpu on a machine without a GPU is normal)."""
    if explicit:
        log.warning(
            "asked for %s, got %s for %s (--log-level DEBUG shows onnxruntime's reason)", asked, got, path
        )
    elif (asked, got) not in _noted_fallbacks:
        _noted_fallbacks.add((asked, got))
        log.info("%s is not usable here: models run on %s (--log-level DEBUG shows why)", asked, got)
    else:
        log.debug("%s runs on %s, not %s", path, got, asked)


@dataclass(frozen=True)
class TensorSpec:
    """A graph input or output: name, numpy dtype, shape with -1 for free dimensions."""

    name: str
    onnx_type: str
    dtype: np.dtype
    shape: tuple[int, ...]


#: onnxruntime's type names for the numpy dtypes we serve.
ONNX_DTYPES: dict[str, np.dtype] = {
    f"tensor({name})": np.dtype(dtype)
    for name, dtype in [
        ("bool", "bool"), ("uint8", "uint8"), ("uint16", "uint16"), ("uint32", "uint32"),
        ("uint64", "uint64"), ("int8", "int8"), ("int16", "int16"), ("int32", "int32"), ("int64", "int64"),
        ("float16", "float16"), ("float", "float32"), ("double", "float64"), ("string", "object"),
    ]
}  # fmt: skip


def _tensor_spec(node: Any) -> TensorSpec:
    """From onnxruntime's NodeArg: symbolic or unknown dimensions become -1."""
    if node.type not in ONNX_DTYPES:
        raise ModelLoadError(f"tensor {node.name!r} has type {node.type}, which is not served")
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in node.shape)
    return TensorSpec(node.name, node.type, ONNX_DTYPES[node.type], shape)


@dataclass(frozen=True)
class SessionOptions:
    providers: tuple[str, ...]
    require_gpu: bool = False
    #: The providers were chosen by the operator (setting or flag), not left at the default: a
    #: fallback from the first one is then a warning for every graph, not a single note.
    explicit_providers: bool = False
    intra_op_threads: int = 0
    spinning: bool = False


class ModelSession:
    """One onnxruntime session and the facts about it that the server reports."""

    def __init__(self, path: Path, options: SessionOptions) -> None:
        ort = onnxruntime()
        available = set(ort.get_available_providers())
        providers = [p for p in options.providers if p in available]
        if not providers:
            raise ModelLoadError(f"none of the providers {list(options.providers)} is available here")
        session_options = ort.SessionOptions()
        session_options.intra_op_num_threads = options.intra_op_threads
        # Busy-waiting pool threads take a core from the event loop, which is the bottleneck for
        # small models on small machines; measured with `convserve bench --compare`.
        spin = "1" if options.spinning else "0"
        session_options.add_session_config_entry("session.intra_op.allow_spinning", spin)
        session_options.add_session_config_entry("session.inter_op.allow_spinning", spin)
        try:
            self._session = ort.InferenceSession(str(path), session_options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            log.error("onnxruntime could not load %s: %s", path, exc)
            reason = str(exc).replace(str(path.parent) + "/", "")  # clients see file names, not our paths
            raise ModelLoadError(f"onnxruntime could not load {path.name}: {reason}") from exc
        self.provider = self._session.get_providers()[0]
        if providers[0] != self.provider:
            explicit = options.explicit_providers or options.require_gpu
            _report_fallback(providers[0], self.provider, path, explicit)
        if options.require_gpu and self.provider != CUDA:
            raise ModelLoadError(f"{REQUIRE_GPU_FAILURE} but {path.name} runs on {self.provider}")
        # Named leading dimensions of the inputs: inputs that name different ones (a decoder's
        # hypotheses and images) cannot be cut into requests along their first axis.
        self._input_batch_names = {
            i.shape[0] for i in self._session.get_inputs() if i.shape and isinstance(i.shape[0], str)
        }
        self.inputs = [_tensor_spec(i) for i in self._session.get_inputs()]
        self.outputs = [_tensor_spec(o) for o in self._session.get_outputs()]
        self.input_names = [t.name for t in self.inputs]
        self.output_names = [t.name for t in self.outputs]
        free = all(t.shape and t.shape[0] == -1 for t in self.inputs + self.outputs)
        #: Every input and output has a free leading dimension, the same one for every input.
        self.batchable = free and len(self._input_batch_names) <= 1

    def warmup(self) -> None:
        """One run on zeros (free dimensions set to 1), so the first request pays no lazy set-up."""
        self.run({t.name: np.zeros([1 if d == -1 else d for d in t.shape], t.dtype) for t in self.inputs})

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run the graph; blocking, so callers run it off the event loop.

        When onnxruntime says the input was at fault (its INVALID_ARGUMENT), the error is the
        client's: InvalidArgument with onnxruntime's reason. Any other failure stays a server error.
        """
        try:
            return self._session.run(self.output_names, feeds)
        except _input_error() as exc:
            raise InvalidArgument(f"the model cannot run this input: {one_line_reason(exc)}") from exc


@cache
def _input_error() -> type[Exception]:
    """onnxruntime's exception for a run whose input was at fault (its status INVALID_ARGUMENT)."""
    return onnxruntime().capi.onnxruntime_pybind11_state.InvalidArgument


def one_line_reason(error: Exception) -> str:
    """onnxruntime's own words, without its status prefix, on one line and at most 300 characters."""
    reason = " ".join(str(error).split())
    for marker in ("Status Message: ", "INVALID_ARGUMENT : "):
        if marker in reason:
            reason = reason.rpartition(marker)[2]
            break
    return reason if len(reason) <= 300 else reason[:297] + "..."
