"""The data plane's requests and results: plain dataclasses and numpy arrays, no wire types.

Transports translate their wire messages (protobuf, JSON) into these and back; the data plane
(service/dataplane/) and the model kinds (service/kinds/) see nothing else. Optional fields are
None when the client did not set them, so defaults are applied in one place. The per-request
types are plain slotted dataclasses, not frozen ones: a frozen one's __init__ costs several times
more, for every request (nothing changes them after the transport builds them).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

#: A parameter's value as KServe v2 carries it (bool, int64, string, double).
ParameterValue = bool | int | float | str
Parameters = Mapping[str, ParameterValue]


# Images ------------------------------------------------------------------------------------------


@dataclass(slots=True)
class EncodedImage:
    """PNG, JPEG or BMP bytes."""

    data: bytes


@dataclass(slots=True)
class RawImage:
    """uint8 pixels, (height, width, channels) in row-major order."""

    data: bytes
    height: int
    width: int
    channels: int


ImageInput = EncodedImage | RawImage | None  # None: the client sent neither


def image_bytes(images: Sequence[ImageInput]) -> int:
    """The bytes a request's images take on the wire (what decoding them costs grows with)."""
    return sum(len(image.data) for image in images if image is not None)


# The task API ------------------------------------------------------------------------------------


@dataclass(slots=True)
class ClassifyRequest:
    model: str
    version: str
    images: Sequence[ImageInput]
    top_k: int | None = None


class Prediction(NamedTuple):
    """One class of a ranked answer (a named tuple: a Classify request makes top_k of them)."""

    label: str
    index: int
    score: float


@dataclass(slots=True)
class ClassifyResult:
    results: list[list[Prediction]]  # per image, best first
    model: str = ""
    version: str = ""


@dataclass(slots=True)
class GenerateRequest:
    model: str
    version: str
    count: int | None = None
    labels: Sequence[int] = ()
    seed: int | None = None
    grid: bool = False
    latents: np.ndarray | None = None  # float32 (count, latent size): instead of the seed's draws

    @property
    def image_count(self) -> int:
        """One image per latent vector given, else `count` (default 1)."""
        if self.latents is not None:
            return len(self.latents)
        return 1 if self.count is None else self.count


@dataclass(slots=True)
class LatentRequest:
    """The latent vectors a seed draws for a generator (what Generate with that seed would use)."""

    model: str
    version: str
    seed: int | None = None
    count: int | None = None


@dataclass(frozen=True, slots=True)
class GeneratedImage:
    png: bytes  # empty when the images come as one grid
    label_index: int
    label: str


@dataclass(slots=True)
class GenerateResult:
    seed: int
    images: list[GeneratedImage]
    grid_png: bytes = b""
    model: str = ""
    version: str = ""


@dataclass(slots=True)
class LatentResult:
    seed: int
    latents: np.ndarray  # float32 (count, latent size)
    model: str = ""
    version: str = ""


@dataclass(slots=True)
class CaptionRequest:
    model: str
    version: str
    images: Sequence[ImageInput]
    beam_size: int | None = None
    max_length: int | None = None
    count: int | None = None
    attention: bool = False


@dataclass(frozen=True, slots=True)
class AttentionMap:
    """One word's attention over the encoder's grid, row by row; over regions: regions x 1."""

    rows: int
    columns: int
    weights: list[float]


@dataclass(frozen=True, slots=True)
class Caption:
    text: str
    words: list[str]
    tokens: list[int]
    log_prob: float
    mean_log_prob: float  # log_prob per token (the words and <end>): low means "not recognised"
    attention: list[AttentionMap]  # one per word, when asked for


@dataclass(frozen=True, slots=True)
class Region:
    """A part of the image that a region captioner attends over, in fractions of width and height."""

    left: float
    top: float
    right: float
    bottom: float


@dataclass(slots=True)
class CaptionResult:
    results: list[list[Caption]]  # per image, best first
    regions: list[list[Region]] = field(default_factory=list)  # per image; empty lists over a grid
    model: str = ""
    version: str = ""


# KServe v2 tensors -------------------------------------------------------------------------------


@dataclass(slots=True)
class InputTensor:
    """One input as the client sent it: raw little-endian bytes, or typed values (not both)."""

    name: str
    datatype: str
    shape: Sequence[int]
    raw: bytes | None = None
    typed: Sequence[Any] | None = None  # the values of the datatype's typed-contents field
    parameters: Parameters = field(default_factory=dict)

    @property
    def size(self) -> int:
        """Bytes of data it carries (an estimate for typed values)."""
        if self.raw is not None:
            return len(self.raw)
        return 8 * len(self.typed) if self.typed is not None else 0


@dataclass(slots=True)
class OutputRequest:
    name: str
    parameters: Parameters = field(default_factory=dict)


@dataclass(slots=True)
class InferRequest:
    model: str
    version: str
    inputs: Sequence[InputTensor]
    outputs: Sequence[OutputRequest] = ()  # empty: every output
    id: str = ""
    parameters: Parameters = field(default_factory=dict)


@dataclass(slots=True)
class InferResult:
    outputs: list[tuple[str, np.ndarray]]  # in the order asked for
    id: str = ""
    model: str = ""
    version: str = ""


# Metadata, configuration, statistics, the repository ---------------------------------------------


@dataclass(frozen=True, slots=True)
class TensorMetadata:
    name: str
    datatype: str  # KServe datatype, e.g. "UINT8"
    shape: list[int]  # -1: any size


@dataclass(frozen=True, slots=True)
class ModelMetadata:
    name: str
    versions: list[str]  # the ready ones
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Triton's model configuration: what perf_analyzer and tritonclient read to build requests."""

    name: str
    platform: str
    backend: str
    max_batch_size: int  # 0: no batch axis
    inputs: list[TensorMetadata]  # dims without the batch axis when max_batch_size > 0
    outputs: list[TensorMetadata]
    instances: int
    on_gpu: bool
    default_model_filename: str
    max_queue_delay_microseconds: int
    max_queue_size: int


@dataclass(frozen=True, slots=True)
class Duration:
    count: int
    ns: int


@dataclass(frozen=True, slots=True)
class ModelStatistics:
    """One version's cumulative statistics (Triton's statistics extension)."""

    name: str
    version: str
    last_inference: int  # ms since the epoch
    inference_count: int
    execution_count: int
    success: Duration
    fail: Duration
    queue: Duration
    compute_input: Duration
    compute_infer: Duration
    compute_output: Duration
    batches: list[tuple[int, Duration]]  # (batch size, compute_infer)


@dataclass(frozen=True, slots=True)
class RecentStatistics:
    """One version's requests over the last `window_seconds` whole seconds."""

    name: str
    version: str
    window_seconds: int
    requests: int  # answered, successes and failures
    failures: int
    p50: float | None  # latency in seconds, over the successful requests; None without any
    p99: float | None
    per_second: list[int]  # requests answered in each second of the window, oldest first


@dataclass(frozen=True, slots=True)
class IndexEntry:
    """One row of the repository index: a model's version and its state (READY, LOADING, UNAVAILABLE)."""

    name: str
    version: str
    state: str
    reason: str


@dataclass(frozen=True, slots=True)
class VersionInfo:
    version: str
    state: str  # loading, ready, failed, unloaded
    reason: str
    provider: str


@dataclass(frozen=True, slots=True)
class InputSpec:
    name: str
    height: int
    width: int
    channels: int
    color_mode: str


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """A model as the task API lists it."""

    name: str
    kind: str
    versions: list[VersionInfo]
    input: InputSpec | None
    labels: list[str]


@dataclass(frozen=True, slots=True)
class ServerMetadata:
    name: str
    version: str
    extensions: list[str]
