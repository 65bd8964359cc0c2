"""`convserve`: run the server, or call one (classify, generate, caption, models, health)."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc
import numpy as np
from google.protobuf import json_format

from service import __version__
from service._proto.convserve.v1 import vision_pb2 as pb
from service.client import DEFAULT_TARGET, DEFAULT_TIMEOUT_SECONDS, VisionClient


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convserve", description="Serve and call classic vision models.")
    parser.add_argument("--version", action="version", version=f"convserve {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the gRPC server (settings also from CONVSERVE_* env)")
    serve.add_argument("--model-repository", type=Path, help="model folder (default: models)")
    serve.add_argument("--host", help="bind address (default: 0.0.0.0)")
    serve.add_argument("--grpc-port", type=int, help="gRPC port (default: 8001)")
    serve.add_argument("--http-port", type=int, help="KServe v2 HTTP/REST port (default: 8000; -1: off)")
    serve.add_argument("--metrics-port", type=int, help="Prometheus port (default: 8002; -1: off)")
    serve.add_argument("--providers", help="comma-separated onnxruntime providers (default: CUDA, then CPU)")
    serve.add_argument("--require-gpu", action="store_true", default=None, help="fail readiness without CUDA")
    serve.add_argument(
        "--repository-control",
        choices=["disabled", "enabled", "admin"],
        help="model load/unload over the network (default: disabled; admin: admin tokens only)",
    )
    serve.add_argument(
        "--no-console",
        dest="console",
        action="store_false",
        default=None,
        help="do not serve the web console at / on the HTTP port (default: served)",
    )
    serve.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="default: INFO")
    serve.add_argument("--log-format", choices=["json", "text"], help="default: json")

    def client_flags(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--target", default=DEFAULT_TARGET, help=f"server address (default: {DEFAULT_TARGET})"
        )
        sub.add_argument(
            "--timeout",
            type=float,
            default=DEFAULT_TIMEOUT_SECONDS,
            help="deadline in seconds (default: %(default)s)",
        )

    def security_flags(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--token",
            default=os.environ.get("CONVSERVE_TOKEN") or None,
            help="bearer token (default: $CONVSERVE_TOKEN); prefer the variable: flags show in `ps`",
        )
        sub.add_argument("--tls", action="store_true", help="TLS, trusting the system's CA certificates")
        sub.add_argument("--tls-ca", type=Path, help="TLS, trusting this PEM CA bundle")
        sub.add_argument("--tls-cert", type=Path, help="client certificate (PEM) for mutual TLS")
        sub.add_argument("--tls-key", type=Path, help="client private key (PEM) for mutual TLS")

    classify = commands.add_parser("classify", help="classify image files")
    classify.add_argument("images", nargs="+", type=Path, help="PNG, JPEG or BMP files")
    classify.add_argument("--model", default="lenet5", help="model name (default: lenet5)")
    classify.add_argument("--model-version", default="", help="model version (default: newest ready)")
    classify.add_argument("--top-k", type=int, default=3, help="classes per image (default: 3)")
    classify.add_argument("--json", action="store_true", help="one JSON object per image")
    client_flags(classify)
    security_flags(classify)

    generate = commands.add_parser("generate", help="generate images with a generator model (dcgan)")
    generate.add_argument("--model", default="dcgan", help="model name (default: dcgan)")
    generate.add_argument(
        "--label",
        type=int,
        action="append",
        default=[],
        help="class index; once for all images or once per image",
    )
    generate.add_argument("--count", type=int, default=1, help="how many images (default: 1)")
    generate.add_argument("--seed", type=int, help="same seed, same images (default: a fresh one, printed)")
    generate.add_argument(
        "--grid", action="store_true", help="write one grid PNG instead of one PNG per image"
    )
    generate.add_argument(
        "--out", type=Path, default=Path("generated.png"), help="PNG path; several images: NAME-0.png, ... "
    )
    generate.add_argument("--json", action="store_true", help="print a JSON summary")
    client_flags(generate)
    security_flags(generate)

    caption = commands.add_parser("caption", help="caption an image with a captioner model (beam search)")
    caption.add_argument("image", type=Path, help="PNG, JPEG or BMP file")
    caption.add_argument("--model", default="captioner", help="model name (default: captioner)")
    caption.add_argument("--model-version", default="", help="model version (default: newest ready)")
    caption.add_argument("--beam", type=int, help="beam size (default: the model's, 3; 1 is greedy)")
    caption.add_argument("--max-length", type=int, help="most words (default: the model's max_length)")
    caption.add_argument("--count", type=int, help="captions to print, best first (default: 1)")
    caption.add_argument("--json", action="store_true", help="one JSON object")
    caption.add_argument(
        "--attention",
        type=Path,
        metavar="PNG",
        help="write the best caption's attention: one panel per word, the map over the image",
    )
    client_flags(caption)
    security_flags(caption)

    models = commands.add_parser("models", help="list the server's models")
    models.add_argument("--json", action="store_true", help="JSON output")
    client_flags(models)
    security_flags(models)

    health = commands.add_parser("health", help="exit 0 when the server (or one model) is SERVING")
    health.add_argument("--service", default="", help="health entry: '' (ready), 'liveness' or a model name")
    client_flags(health)
    security_flags(health)

    # Listed for --help only: main() hands `convserve bench ...` to `convserve-bench` before parsing.
    commands.add_parser("bench", help="alias of convserve-bench (development install only)", add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        return _bench(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    try:
        with VisionClient(
            args.target,
            timeout=args.timeout,
            token=args.token,
            tls=args.tls,
            tls_ca=args.tls_ca,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
        ) as client:
            commands = {
                "classify": _classify,
                "generate": _generate,
                "caption": _caption,
                "models": _models,
                "health": _health,
            }
            return commands[args.command](client, args)
    except grpc.RpcError as exc:
        print(f"error: {exc.code().name}: {exc.details() or 'the server gave no details'}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _bench(argv: list[str]) -> int:
    """`convserve bench ARGS` runs `convserve-bench ARGS` in a child process; `service` never imports it."""
    if importlib.util.find_spec("bench") is None:
        print(
            "error: no convserve-bench here: it comes with the development install (make install)",
            file=sys.stderr,
        )
        return 1
    try:
        return subprocess.call([sys.executable, "-m", "bench", *argv])
    except KeyboardInterrupt:
        return 130


def _serve(args: argparse.Namespace) -> int:
    from service.engine.sessions import ModelLoadError, onnxruntime
    from service.observability.logs import configure_logging
    from service.server import ConvserveServer
    from service.settings import Settings

    try:
        onnxruntime()
    except ModelLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    overrides = {
        "model_repository": args.model_repository,
        "host": args.host,
        "grpc_port": args.grpc_port,
        "http_port": args.http_port,
        "metrics_port": args.metrics_port,
        "providers": args.providers.split(",") if args.providers else None,
        "require_gpu": args.require_gpu,
        "repository_control": args.repository_control,
        "console": args.console,
        "log_level": args.log_level,
        "log_format": args.log_format,
    }
    settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    configure_logging(settings.log_level, settings.log_format)

    async def run() -> None:
        server = ConvserveServer(settings)
        await server.start()
        await server.wait_for_termination()

    try:
        asyncio.run(run())
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _classify(client: VisionClient, args: argparse.Namespace) -> int:
    response = client.classify(args.images, model=args.model, version=args.model_version, top_k=args.top_k)
    for path, result in zip(args.images, response.results, strict=True):
        predictions = [
            {"label": p.label, "index": p.index, "score": round(p.score, 6)} for p in result.predictions
        ]
        if args.json:
            record = {"image": str(path), "model": response.model, "version": response.version}
            print(json.dumps({**record, "predictions": predictions}))
        else:
            ranked = ", ".join(f"{p['label']} ({p['score']:.3f})" for p in predictions)
            print(f"{path}: {predictions[0]['label']}    [{ranked}]")
    return 0


def _generate(client: VisionClient, args: argparse.Namespace) -> int:
    response = client.generate(args.model, args.count, args.label, args.seed, args.grid)
    if args.grid:
        paths = [args.out]
        args.out.write_bytes(response.grid_png)
    elif len(response.images) == 1:
        paths = [args.out]
        args.out.write_bytes(response.images[0].png)
    else:
        paths = [
            args.out.with_name(f"{args.out.stem}-{i}{args.out.suffix}") for i in range(len(response.images))
        ]
        for path, image in zip(paths, response.images, strict=True):
            path.write_bytes(image.png)
    labels = [image.label for image in response.images]
    if args.json:
        record = {"model": response.model, "version": response.version, "seed": response.seed}
        print(json.dumps({**record, "labels": labels, "files": [str(p) for p in paths]}))
    else:
        files = ", ".join(map(str, paths))
        print(f"seed {response.seed}: {len(labels)} image(s) of {' '.join(labels)} -> {files}")
    return 0


def _caption(client: VisionClient, args: argparse.Namespace) -> int:
    response = client.caption(
        [args.image],
        model=args.model,
        version=args.model_version,
        beam_size=args.beam,
        max_length=args.max_length,
        count=args.count,
        attention=args.attention is not None,
    )
    captions = response.results[0].captions
    if args.attention is not None:
        from service.client.attention import attention_png  # Pillow only

        best = captions[0]
        maps = [np.asarray(a.weights, np.float32).reshape(a.rows, a.columns) for a in best.attention]
        regions = [(r.left, r.top, r.right, r.bottom) for r in response.results[0].regions] or None
        args.attention.write_bytes(attention_png(args.image.read_bytes(), list(best.words), maps, regions))
    if args.json:
        record = {"image": str(args.image), "model": response.model, "version": response.version}
        rows = [
            {
                "text": c.text,
                "words": list(c.words),
                "log_prob": round(c.log_prob, 6),
                "mean_log_prob": round(c.mean_log_prob, 6),
            }
            for c in captions
        ]
        if args.attention is not None:
            record["attention"] = str(args.attention)
        print(json.dumps({**record, "captions": rows}))
    else:
        for c in captions:
            print(f"{c.text}    ({c.log_prob:.3f}, {c.mean_log_prob:.3f} per token)")
        if args.attention is not None:
            print(f"attention: {args.attention}")
    return 0


def _models(client: VisionClient, args: argparse.Namespace) -> int:
    response = client.list_models()
    if args.json:
        as_dict = json_format.MessageToDict(
            response, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
        for model in as_dict["models"]:
            for version in model["versions"]:
                version["state"] = _state_name(pb.ModelState.Value(version["state"]))
        print(json.dumps(as_dict["models"], indent=2))
        return 0
    if not response.models:
        print("no models")
    for model in response.models:
        print(_model_line(model))
        for v in model.versions:
            state = _state_name(v.state)
            detail = v.provider if state == "READY" else v.reason
            print(f"  version {v.version or '-'}: {state}  {detail}")
    return 0


def _model_line(model: pb.ModelInfo) -> str:
    """`name  kind=...  input=CxHxW MODE`; a model without an image input (a tensor model) has no input."""
    line = f"{model.name}  kind={model.kind or '?'}"
    spec = model.input
    if spec.channels and spec.height and spec.width:
        line += f"  input={spec.channels}x{spec.height}x{spec.width} {spec.color_mode}"
    return line


def _health(client: VisionClient, args: argparse.Namespace) -> int:
    try:
        status = client.health(args.service)
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.NOT_FOUND:
            raise
        print(
            f"error: NOT_FOUND: the server has no health entry {args.service!r} "
            "('' for readiness, 'liveness', or the name of a model it serves)",
            file=sys.stderr,
        )
        return 1
    print(status)
    return 0 if status == "SERVING" else 1


def _state_name(state: int) -> str:
    """READY, LOADING, FAILED, UNLOADED: the names the docs use, without the proto's prefix."""
    return pb.ModelState.Name(state).removeprefix("MODEL_STATE_")


if __name__ == "__main__":
    raise SystemExit(main())
