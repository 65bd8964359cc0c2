"""`convserve-bench` (also `python -m bench`): the command line of the load generator and the suite."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from bench import load
from service.client import DEFAULT_TARGET, DEFAULT_TIMEOUT_SECONDS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convserve-bench",
        description="closed-loop load on a server, --compare batching off / on / in-process, "
        "or --transports KServe v2 over gRPC / HTTP",
    )
    parser.add_argument("--model", default="lenet5", help="model name (default: lenet5)")
    parser.add_argument(
        "--api",
        choices=load.APIS,
        default="task",
        help="task: Classify; kserve: ModelInfer over gRPC; http: KServe v2 infer over HTTP/REST with "
        f"binary tensors, --target being the HTTP port (default there: {load.DEFAULT_HTTP_TARGET}) "
        "(default: task; --transports: not used)",
    )
    parser.add_argument(
        "--concurrency",
        type=load.parse_concurrency,
        help="workers, each sending its next request when the previous answers; N or N,N,... "
        f"(default: {load.DEFAULT_CONCURRENCY}; with --compare or --transports: 1,16,64)",
    )
    amount = parser.add_mutually_exclusive_group()
    amount.add_argument(
        "--duration",
        type=float,
        help=f"seconds measured per point (default: {load.DEFAULT_DURATION_SECONDS:g}; "
        f"with --compare or --transports: {load.COMPARE_DURATION_SECONDS:g})",
    )
    amount.add_argument("--requests", type=int, help="requests measured per point, instead of --duration")
    parser.add_argument("--images-per-request", type=int, default=1, help="images per request (default: 1)")
    parser.add_argument(
        "--warmup",
        type=float,
        default=load.DEFAULT_WARMUP_SECONDS,
        help="seconds of uncounted load before each point (default: %(default)s)",
    )
    parser.add_argument(
        "--channels",
        type=int,
        default=load.DEFAULT_CHANNELS,
        help="gRPC channels (connections) shared round-robin by the workers (default: %(default)s)",
    )
    parser.add_argument(
        "--json",
        nargs="?",
        const="-",
        metavar="PATH",
        help="machine-readable result: to stdout, or to PATH (comparisons: raw repeats and summary)",
    )
    parser.add_argument(
        "--compare",
        action="store_true",
        help="start servers with batching off and on and compare them with in-process onnxruntime",
    )
    parser.add_argument(
        "--transports",
        action="store_true",
        help="start one server (defaults) and compare KServe v2 over gRPC (raw tensors) and over HTTP "
        "(binary tensors)",
    )
    parser.add_argument(
        "--suite",
        action="store_true",
        help="the performance suite: convserve beside a no-op KServe v2 server (transport limit) and "
        "in-process onnxruntime (compute limit), pinned to separate cores, for --models",
    )
    parser.add_argument(
        "--models",
        type=lambda text: tuple(m for m in text.split(",") if m),
        default=None,
        help="--suite: comma-separated models (default: lenet5,scenes-resnet)",
    )
    parser.add_argument(
        "--model-repository",
        type=Path,
        default=Path("models"),
        help="--compare, --transports, --suite: repository to serve (default: models)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=load.COMPARE_REPEATS,
        help="--compare, --transports, --suite: repeats (default: %(default)s)",
    )
    parser.add_argument(
        "--markdown",
        type=Path,
        metavar="PATH",
        help="--compare, --transports, --suite: also write the table to PATH",
    )
    parser.add_argument(
        "--target",
        default=None,
        help=f"server address (default: {DEFAULT_TARGET}; --api http: {load.DEFAULT_HTTP_TARGET})",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_SECONDS,
        help="deadline of each request in seconds (default: %(default)s)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Exit 0 when requests succeeded, 1 when none did or the bench could not run."""
    return load.main(build_parser().parse_args(argv))
