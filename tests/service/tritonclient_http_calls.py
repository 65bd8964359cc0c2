"""Run by test_http.py in its own process (see tritonclient_calls.py for why): tritonclient.http,
unmodified, against the server's HTTP/REST port. Prints what it saw, as JSON.

usage: python tritonclient_http_calls.py HOST:PORT IMAGES.npy
"""

from __future__ import annotations

import json
import sys

import numpy as np
import tritonclient.http as httpclient


def infer(client: httpclient.InferenceServerClient, images: np.ndarray, binary: bool) -> list[int]:
    image = httpclient.InferInput("image", list(images.shape), "UINT8")
    image.set_data_from_numpy(images, binary_data=binary)
    logits = httpclient.InferRequestedOutput("logits", binary_data=binary)
    result = client.infer("lenet5", [image], outputs=[logits], request_id=f"http-{binary}")
    assert result.get_response()["id"] == f"http-{binary}"
    return result.as_numpy("logits").argmax(axis=1).tolist()


def main(target: str, images_path: str) -> None:
    images = np.load(images_path)
    client = httpclient.InferenceServerClient(url=target)
    print(
        json.dumps(
            {
                "live": client.is_server_live(),
                "ready": client.is_server_ready(),
                "model_ready": client.is_model_ready("lenet5"),
                "unknown_ready": client.is_model_ready("no-such-model"),
                "server": client.get_server_metadata(),
                "metadata": client.get_model_metadata("lenet5"),
                "config": client.get_model_config("lenet5"),
                "binary_classes": infer(client, images, binary=True),
                "json_classes": infer(client, images, binary=False),
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
