"""Small ONNX graphs built in the tests, for what the server does whatever the model's quality."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import yaml
from onnx import TensorProto, helper


def _save(graph: onnx.GraphProto, path: Path) -> None:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True)
    onnx.save(model, str(path))


def write_config(model_dir: Path, manifest: dict[str, Any]) -> None:
    (model_dir / "config.yaml").write_text(yaml.safe_dump(manifest))


def toy_generator(path: Path, latent: int) -> None:
    """image = uint8(clip(30 * (z + label) + 128)), reshaped to (N, 1, 8, 8): labels and latents both show."""
    nodes = [
        helper.make_node("Cast", ["label"], ["label_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["label_f", "axis1"], ["label_col"]),
        helper.make_node("Add", ["z", "label_col"], ["shifted"]),
        helper.make_node("Mul", ["shifted", "thirty"], ["scaled"]),
        helper.make_node("Add", ["scaled", "mid"], ["centred"]),
        helper.make_node("Clip", ["centred", "zero", "top"], ["clipped"]),
        helper.make_node("Reshape", ["clipped", "shape"], ["square"]),
        helper.make_node("Cast", ["square"], ["image"], to=TensorProto.UINT8),
    ]
    constants = [
        helper.make_tensor("axis1", TensorProto.INT64, [1], [1]),
        helper.make_tensor("thirty", TensorProto.FLOAT, [], [30.0]),
        helper.make_tensor("mid", TensorProto.FLOAT, [], [128.0]),
        helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
        helper.make_tensor("top", TensorProto.FLOAT, [], [255.0]),
        helper.make_tensor("shape", TensorProto.INT64, [4], [-1, 1, 8, 8]),
    ]
    graph = helper.make_graph(
        nodes,
        "toy_generator",
        [
            helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", latent]),
            helper.make_tensor_value_info("label", TensorProto.INT64, ["batch"]),
        ],
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["batch", 1, 8, 8])],
        initializer=constants,
    )
    _save(graph, path)


#: The rows of the lookup table `lookup_model` gathers from.
LOOKUP_ROWS = 10


def lookup_model(path: Path, scale: int = 1, offset: int = 0) -> None:
    """out = table[index * scale + offset], table (10, 2) = [[0, 1], [2, 3], ...]: onnxruntime fails a
    run whose row falls outside the table, which no check of the server's can know beforehand.
    With a large `scale` every run fails but the warm-up's (index 0); with a large `offset` every run."""
    table = helper.make_tensor(
        "table", TensorProto.FLOAT, [LOOKUP_ROWS, 2], np.arange(2 * LOOKUP_ROWS, dtype=np.float32).tolist()
    )
    constants = [
        table,
        helper.make_tensor("scale", TensorProto.INT64, [], [scale]),
        helper.make_tensor("offset", TensorProto.INT64, [], [offset]),
    ]
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["index", "scale"], ["scaled"]),
            helper.make_node("Add", ["scaled", "offset"], ["row"]),
            helper.make_node("Gather", ["table", "row"], ["out"], axis=0),
        ],
        "lookup",
        [helper.make_tensor_value_info("index", TensorProto.INT64, ["batch"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 2])],
        initializer=constants,
    )
    _save(graph, path)
