"""A reference KServe v2 HTTP server on stock aiohttp: `noop` answers zeros, `naive` runs the model inline.

It speaks the binary tensor extension (a JSON header, then the raw tensors), as the bench sends.

    python -m bench.reference.http_server --mode naive --model-repository models \
        --model lenet5 --port 8100
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from aiohttp import web

from bench.reference.model import Model, load

HEADER_LENGTH = "Inference-Header-Content-Length"


def make_app(models: dict[str, Model], naive: bool) -> web.Application:
    async def ready(request: web.Request) -> web.Response:
        return web.Response()

    async def infer(request: web.Request) -> web.Response:
        model = models.get(request.match_info["model"])
        if model is None:
            return web.json_response({"error": "no such model"}, status=404)
        body = await request.read()
        length = int(request.headers.get(HEADER_LENGTH, len(body)))
        spec = json.loads(body[:length])["inputs"][0]
        batch = np.frombuffer(body[length:], model.input_dtype).reshape(spec["shape"])
        values = model.run(batch) if naive else model.zeros(batch)
        outputs = [
            {
                "name": output.name,
                "datatype": output.datatype,
                "shape": list(array.shape),
                "parameters": {"binary_data_size": array.nbytes},
            }
            for output, array in zip(model.outputs, values, strict=True)
        ]
        head = json.dumps({"model_name": model.name, "outputs": outputs}).encode()
        return web.Response(
            body=head + b"".join(array.tobytes() for array in values),
            headers={HEADER_LENGTH: str(len(head))},
            content_type="application/octet-stream",
        )

    app = web.Application()
    app.router.add_get("/v2/health/ready", ready)
    app.router.add_post("/v2/models/{model}/infer", infer)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("noop", "naive"), required=True)
    parser.add_argument("--model-repository", type=Path, required=True)
    parser.add_argument("--model", action="append", required=True, help="repeatable")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    models = {name: load(args.model_repository, name) for name in args.model}
    web.run_app(make_app(models, args.mode == "naive"), host="127.0.0.1", port=args.port, print=None)


if __name__ == "__main__":
    main()
