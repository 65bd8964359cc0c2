"""One tritonclient, unmodified, against a running server: run by test_client_matrix.py in the venv of
the tritonclient version under test (its `inference` protobuf package cannot live beside the
server's). Every call is made as a user would; what came back, or the error the client raised, is
printed as JSON for the test to judge.

usage: python tritonclient_matrix.py grpc|http HOST:PORT IMAGES.npy SPARE_MODEL
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from importlib.metadata import version
from typing import Any

import numpy as np
from tritonclient.utils import InferenceServerException


def attempt(call: Callable[[], Any]) -> dict[str, Any]:
    """{"value": what the call returned} or {"error": message, "status": status} of what it raised."""
    try:
        return {"value": call()}
    except InferenceServerException as error:
        return {"error": error.message(), "status": error.status()}
    except Exception as error:  # what a user would see: a client that cannot parse the answer
        return {"error": f"{type(error).__name__}: {error}", "status": "client"}


def main(protocol: str, url: str, images_path: str, spare: str) -> dict[str, Any]:
    if protocol == "grpc":
        import tritonclient.grpc as tc

        as_json = {"as_json": True}
    else:
        import tritonclient.http as tc

        as_json = {}
    images = np.load(images_path)  # (N, 1, 32, 32) uint8
    client = tc.InferenceServerClient(url=url)

    def infer(binary: bool, model: str = "lenet5", data: np.ndarray = images, **output: Any) -> Any:
        image = tc.InferInput("image", list(data.shape), "UINT8")
        if protocol == "http":  # JSON or binary tensors: only HTTP has the choice
            image.set_data_from_numpy(data, binary_data=binary)
            output["binary_data"] = binary
        else:
            image.set_data_from_numpy(data)
        logits = tc.InferRequestedOutput("logits", **output)
        result = client.infer(model, [image], outputs=[logits], request_id=f"{protocol}-{binary}")
        assert result.get_response(**as_json)["id"] == f"{protocol}-{binary}"
        array = result.as_numpy("logits")
        if array.dtype == np.object_:  # BYTES: the classification extension's "score:index:label"
            return [[item.decode() if isinstance(item, bytes) else item for item in row] for row in array]
        return array.argmax(axis=1).tolist()

    def config(model: str) -> dict[str, Any]:
        answer = client.get_model_config(model, **as_json)
        return answer["config"] if protocol == "grpc" else answer

    def statistics(model: str = "") -> list[dict[str, Any]]:
        return client.get_inference_statistics(model, **as_json)["model_stats"]

    def index() -> list[dict[str, Any]]:
        answer = client.get_model_repository_index(**as_json)
        return answer["models"] if protocol == "grpc" else answer

    seen: dict[str, Any] = {
        "version": version("tritonclient"),
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready("lenet5"),
        "unknown_ready": attempt(lambda: client.is_model_ready("no-such-model")),
        "server": client.get_server_metadata(**as_json),
        "metadata": client.get_model_metadata("lenet5", **as_json),
        "config": attempt(lambda: config("lenet5")),
        "binary_classes": attempt(lambda: infer(binary=True)),
        "classification": attempt(lambda: infer(binary=True, data=images[:2], class_count=3)),
        "statistics": attempt(lambda: statistics("lenet5")),
        "all_statistics": attempt(statistics),
        "index": attempt(index),
        "unknown_model": attempt(lambda: infer(binary=True, model="no-such-model")),
        "bad_shape": attempt(lambda: infer(binary=True, data=images[:, :, :28, :28])),
    }
    if protocol == "http":
        seen["json_classes"] = attempt(lambda: infer(binary=False))
        seen["json_classification"] = attempt(lambda: infer(binary=False, data=images[:2], class_count=3))
    # model control, last: a spare copy, so that nothing else on the server depends on it
    seen["unload"] = attempt(lambda: client.unload_model(spare))
    seen["spare_ready_after_unload"] = client.is_model_ready(spare)
    seen["index_after_unload"] = attempt(index)
    seen["unload_unknown"] = attempt(lambda: client.unload_model("no-such-model"))
    seen["load"] = attempt(lambda: client.load_model(spare))
    seen["spare_ready_after_load"] = client.is_model_ready(spare)
    seen["spare_classes_after_load"] = attempt(lambda: infer(binary=True, model=spare))
    return seen


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:]), default=str))
