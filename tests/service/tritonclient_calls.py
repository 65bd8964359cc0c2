"""Run by test_kserve.py in its own process: tritonclient registers its own `inference` protobuf
package, which cannot live beside ours in one process. Prints what tritonclient saw, as JSON.

usage: python tritonclient_calls.py HOST:PORT IMAGES.npy
"""

from __future__ import annotations

import json
import sys

import numpy as np
import tritonclient.grpc as grpcclient


def main(target: str, images_path: str) -> None:
    images = np.load(images_path)  # (N, 1, 32, 32) uint8
    client = grpcclient.InferenceServerClient(url=target)
    metadata = client.get_model_metadata("lenet5", as_json=True)
    config = client.get_model_config("lenet5", as_json=True)["config"]
    inputs = [grpcclient.InferInput("image", list(images.shape), "UINT8")]
    inputs[0].set_data_from_numpy(images)
    outputs = [grpcclient.InferRequestedOutput("logits")]
    result = client.infer("lenet5", inputs, outputs=outputs, request_id="triton-1")
    logits = result.as_numpy("logits")
    response = result.get_response(as_json=True)
    statistics = client.get_inference_statistics("lenet5", as_json=True)
    index = client.get_model_repository_index(as_json=True)
    print(
        json.dumps(
            {
                "live": client.is_server_live(),
                "ready": client.is_server_ready(),
                "model_ready": client.is_model_ready("lenet5"),
                "unknown_ready": client.is_model_ready("no-such-model"),
                "server": client.get_server_metadata(as_json=True),
                "metadata": metadata,
                "config": config,
                "classes": logits.argmax(axis=1).tolist(),
                "logits_shape": list(logits.shape),
                "id": response.get("id"),
                "statistics": statistics,
                "index": index,
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
