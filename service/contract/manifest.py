"""The model manifest (`models/<name>/config.yaml`): written by the trainer, read by the server.

One schema for both sides, so what the server does to an image is exactly what the trainer
recorded about its training data.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.contract.tensor_names import GENERATOR_INPUTS, GENERATOR_OUTPUT

CONFIG_FILE = "config.yaml"
#: Health entries of the server itself; no model may take these names.
RESERVED_NAMES = frozenset({"liveness"})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InputSpec(_Strict):
    """The tensor the ONNX graph takes: uint8 images, (N, C, H, W)."""

    name: str = "image"
    channels: Literal[1, 3]
    height: int = Field(gt=0)
    width: int = Field(gt=0)
    color_mode: Literal["L", "RGB"]

    @model_validator(mode="after")
    def _channels_match_mode(self) -> InputSpec:
        expected = 1 if self.color_mode == "L" else 3
        if self.channels != expected:
            raise ValueError(f"color_mode {self.color_mode} needs {expected} channel(s), not {self.channels}")
        return self


class DigitAdaptation(_Strict):
    """How a real image of a digit is brought to the training distribution.

    The training digits are bright ink on a dark background, drawn on a `canvas` x `canvas`
    binary bitmap with a thick pen (about `ink_fraction` of the canvas is ink, whatever the
    digit), block-averaged down to `source_size` x `source_size` with `levels` grey levels,
    then resized to the model input. Real images (dark ink on paper, any size, any pen) are
    inverted when needed, their strokes thickened or thinned to the same ink fraction, and
    sent along the same path.
    """

    kind: Literal["digits"] = "digits"
    canvas: int = Field(default=32, gt=0)
    source_size: int = Field(default=8, gt=0)
    levels: int = Field(default=17, ge=2)
    ink_fraction: float = Field(default=0.3, gt=0, lt=1)

    @model_validator(mode="after")
    def _canvas_divides(self) -> DigitAdaptation:
        if self.canvas % self.source_size:
            raise ValueError("canvas must be a multiple of source_size")
        return self


class ResizeAdaptation(_Strict):
    """Plain images: convert the colour mode and resize to the model input."""

    kind: Literal["resize"] = "resize"


class VersionPolicy(_Strict):
    """Which versions are served: the newest `latest` (default 1), `all`, or `specific` ones."""

    latest: int | None = Field(default=None, gt=0)
    all: bool | None = None
    specific: list[int] | None = None

    @model_validator(mode="after")
    def _one_policy(self) -> VersionPolicy:
        chosen = [self.latest is not None, bool(self.all), self.specific is not None]
        if sum(chosen) > 1:
            raise ValueError("choose one of latest, all, specific")
        return self

    def select(self, versions: list[str]) -> list[str]:
        """The versions to serve among those on disk (newest first in, newest first out)."""
        if self.all:
            return list(versions)
        if self.specific is not None:
            wanted = {str(v) for v in self.specific}
            return [v for v in versions if v in wanted]
        return versions[: self.latest or 1]


class Batching(_Strict):
    """Per-model dynamic batching; unset fields take the server-wide defaults (settings)."""

    max_batch_size: int | None = Field(default=None, ge=0)  # rows per run; 1: off; 0: no batch axis
    max_queue_delay: float | None = Field(default=None, ge=0)  # seconds to wait for a fuller batch
    max_queue_size: int | None = Field(default=None, gt=0)  # rows waiting before requests are refused
    instances: int | None = Field(default=None, gt=0)  # concurrent onnxruntime runs


class GeneratorSpec(_Strict):
    """A label-conditional image generator: (latent z, label) -> uint8 images (N, C, H, W)."""

    latent_input: str = GENERATOR_INPUTS[0]  # float32 (N, latent_size), drawn from a standard normal
    label_input: str = GENERATOR_INPUTS[1]  # int64 (N,), an index into `labels`
    latent_size: int = Field(gt=0)
    output: str = GENERATOR_OUTPUT  # uint8 (N, channels, height, width); scaling to 0..255 is in the graph
    channels: Literal[1, 3] = 1
    height: int = Field(gt=0)
    width: int = Field(gt=0)


class CaptionerSpec(_Strict):
    """An image captioner as two graphs: the encoder (once per image) and one decoder step (per word).

    encoder: uint8 image (N, 3, H, W) -> features (N, L, D), projected features (N, L, A) and the
    initial LSTM state h, c (N, hidden). decoder, for K hypotheses over M images: token (K,) int64,
    h, c (K, hidden), features (M, L, D), projected (M, L, A), image_index (K,) int64 -> log-probabilities
    of the next word (K, V), the next h, c and the attention weights (K, L). (Older decoders take
    features and projected per hypothesis, without image_index.)

    The L attended positions are either the cells of a `grid` or, for a model that attends over
    object regions, `regions` boxes that the encoder also outputs as `boxes` (N, L, 4): left, top,
    right, bottom in fractions of the image's width and height.
    """

    encoder_file: str = "encoder.onnx"
    decoder_file: str = "decoder.onnx"
    vocabulary: list[str] = Field(min_length=5)  # index -> word, special tokens first
    start_token: int = Field(ge=0)
    end_token: int = Field(ge=0)
    max_length: int = Field(gt=0)  # words, not counting <start> and <end>
    max_repeats: int | None = Field(default=None, gt=0)  # the most times a caption says one word
    default_beam_size: int = Field(default=3, gt=0)
    grid: tuple[int, int] | None = None  # the attention grid (rows, columns) that the L weights lay out as
    regions: int | None = Field(default=None, gt=0)  # or: L regions, boxed by the encoder's `boxes`

    @model_validator(mode="after")
    def _grid_or_regions(self) -> CaptionerSpec:
        if (self.grid is None) == (self.regions is None):
            raise ValueError("a captioner attends over a grid or over regions: give exactly one")
        return self

    @property
    def positions(self) -> int:
        """L: the grid's cells or the regions."""
        if self.grid is not None:
            return self.grid[0] * self.grid[1]
        assert self.regions is not None, "the validator says so"
        return self.regions


class Provenance(_Strict):
    """Where a published version came from, so a result can be reproduced."""

    seed: int
    data: str
    created: str
    git_revision: str
    torch_version: str = ""
    trainer: str = ""


class Manifest(_Strict):
    """Everything the server needs to know about a model besides its ONNX files.

    kind `classifier` serves Classify and needs input, adaptation and labels; kind `generator`
    serves Generate and needs its generator spec and labels; kind `captioner` needs its input,
    adaptation and captioner spec (encoder and decoder graphs); kind `tensor` is a plain ONNX model
    reachable through KServe v2 only, and needs nothing but its name.
    """

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    kind: Literal["classifier", "generator", "captioner", "tensor"]
    description: str = ""
    input: InputSpec | None = None
    output_name: str = "logits"
    adaptation: DigitAdaptation | ResizeAdaptation | None = Field(default=None, discriminator="kind")
    labels: list[str] | None = None
    generator: GeneratorSpec | None = None
    captioner: CaptionerSpec | None = None
    version_policy: VersionPolicy = VersionPolicy()
    batching: Batching = Batching()
    metrics: dict[str, float] = {}
    provenance: Provenance | None = None

    @model_validator(mode="after")
    def _name_is_not_reserved(self) -> Manifest:
        if self.name in RESERVED_NAMES:
            raise ValueError(f"{self.name!r} is reserved (a health entry of the server)")
        return self

    @model_validator(mode="after")
    def _classifier_is_complete(self) -> Manifest:
        needs = {
            "classifier": ("input", "adaptation", "labels"),
            "generator": ("generator", "labels"),
            "captioner": ("input", "adaptation", "captioner"),
        }
        missing = [f for f in needs.get(self.kind, ()) if not getattr(self, f)]
        if missing:
            raise ValueError(f"a {self.kind} needs {', '.join(missing)}")
        return self


def load_manifest(model_dir: Path) -> Manifest:
    """Read and validate `<model_dir>/config.yaml`."""
    with open(model_dir / CONFIG_FILE, encoding="utf-8") as f:
        return Manifest.model_validate(yaml.safe_load(f))


def write_manifest(model_dir: Path, manifest: Manifest) -> Path:
    """Write the manifest atomically: a reader sees the old file or the new one, never half."""
    model_dir.mkdir(parents=True, exist_ok=True)
    data = manifest.model_dump(mode="json", exclude_none=True)
    data = {key: value for key, value in data.items() if value != {}}  # e.g. batching: server defaults
    text = yaml.safe_dump(data, sort_keys=False)
    fd, tmp = tempfile.mkstemp(dir=model_dir, prefix=".config-", suffix=".yaml")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp, 0o644)  # mkstemp makes it 0600; a server running as another user must read it
    target = model_dir / CONFIG_FILE
    os.replace(tmp, target)
    return target
