"""What a reference server knows of a model: an onnxruntime session on its newest version."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

#: onnxruntime's tensor types and the KServe v2 datatype and numpy type of each.
TYPES: dict[str, tuple[str, type[np.generic]]] = {
    "tensor(float)": ("FP32", np.float32),
    "tensor(uint8)": ("UINT8", np.uint8),
    "tensor(int64)": ("INT64", np.int64),
}


@dataclass(frozen=True)
class Output:
    name: str
    datatype: str
    dtype: type[np.generic]
    row_shape: tuple[int, ...]  # without the batch dimension

    def zeros(self, rows: int) -> np.ndarray:
        return np.zeros((rows, *self.row_shape), self.dtype)


@dataclass(frozen=True)
class Model:
    name: str
    session: ort.InferenceSession
    input_name: str
    input_dtype: type[np.generic]
    outputs: tuple[Output, ...]

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        return self.session.run(None, {self.input_name: batch})

    def zeros(self, batch: np.ndarray) -> list[np.ndarray]:
        return [output.zeros(len(batch)) for output in self.outputs]


def load(repository: Path, name: str) -> Model:
    """`<repository>/<name>/<newest version>/model.onnx`, with one intra-op thread per CPU this
    process may use (onnxruntime's own default counts the host's cores, not the affinity mask)."""
    versions = [p for p in (repository / name).iterdir() if p.name.isdigit()]
    newest = max(versions, key=lambda p: int(p.name))
    options = ort.SessionOptions()
    options.intra_op_num_threads = len(os.sched_getaffinity(0))
    session = ort.InferenceSession(str(newest / "model.onnx"), options, providers=["CPUExecutionProvider"])
    (first,) = session.get_inputs()
    outputs = tuple(Output(o.name, *TYPES[o.type], tuple(o.shape[1:])) for o in session.get_outputs())
    return Model(name, session, first.name, TYPES[first.type][1], outputs)
