"""Compare the request path of git revisions in one run: is a change free, or what does it cost?

Each revision is checked out in a temporary worktree and served from it with this checkout's
virtual environment (so only the server's code differs), every server pinned to the same core with
one onnxruntime thread, the load generator (`convserve-bench`) on another core, and the revisions
measured interleaved point by point (A B C A B C ...) so that a busy machine slows them all alike.
It prints, per API and concurrency, the median requests/s of each revision with its spread and the
ratio to the first revision.

    python -m bench.compare_revisions --model-repository models --model lenet5 86bf123 HEAD
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

from bench.load import ServerProcess, free_ports, wait_until_serving

ROOT = Path(__file__).resolve().parent.parent


def _worktree(stack: ExitStack, revision: str, folder: Path) -> Path:
    """A detached checkout of `revision`, removed when the run ends."""
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(folder), revision], check=True)
    stack.callback(subprocess.run, ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(folder)])
    return folder


def _serve(stack: ExitStack, checkout: Path, repository: Path, core: int, log: Path) -> ServerProcess:
    """Start the server of `checkout` pinned to `core`, with one onnxruntime thread (a revision
    whose default lets onnxruntime's pool reach the load generator's core would not be compared
    like for like)."""
    grpc_port, http_port = free_ports(2)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CONVSERVE_")}
    environment = clean | {"CONVSERVE_INTRA_OP_THREADS": "1", "CONVSERVE_REPOSITORY_POLL_SECONDS": "0"}
    command = [
        sys.executable, "-m", "service", "serve", "--model-repository", str(repository.resolve()),
        "--host", "127.0.0.1", "--grpc-port", str(grpc_port), "--http-port", str(http_port),
        "--metrics-port", "-1",
    ]  # fmt: skip
    with log.open("wb") as out:  # `python -m service` run in the checkout imports the checkout's code
        process = subprocess.Popen(
            command, cwd=checkout, env=environment, stdout=out, stderr=subprocess.STDOUT,
            preexec_fn=lambda: os.sched_setaffinity(0, {core}),
        )  # fmt: skip
    server = ServerProcess(process, f"127.0.0.1:{grpc_port}", log, f"127.0.0.1:{http_port}")
    stack.callback(server.stop)
    return server


def _measure(target: str, api: str, model: str, concurrency: str, core: int, out: Path) -> list[dict]:
    command = [
        str(Path(sys.executable).with_name("convserve-bench")), "--target", target, "--api", api,
        "--model", model, "--concurrency", concurrency, "--duration", "4", "--warmup", "1",
        "--json", str(out),
    ]  # fmt: skip
    subprocess.run(
        command, check=True, stdout=subprocess.DEVNULL, preexec_fn=lambda: os.sched_setaffinity(0, {core})
    )
    return json.loads(out.read_text())["results"]


def _labels(revisions: list[str]) -> list[str]:
    """The revisions as named, a repeated one numbered (HEAD, HEAD (2)): each server its own column."""
    labels = []
    for i, revision in enumerate(revisions):
        seen = revisions[:i].count(revision)
        labels.append(f"{revision} ({seen + 1})" if seen else revision)
    return labels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("revisions", nargs="+", help="git revisions; the first is the reference")
    parser.add_argument("--model-repository", type=Path, required=True)
    parser.add_argument("--model", default="lenet5")
    parser.add_argument("--apis", default="kserve,task")
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--server-core", type=int, default=0)
    parser.add_argument("--client-core", type=int, default=1)
    args = parser.parse_args(argv)

    labels = _labels(args.revisions)
    rates: dict[tuple[str, int, str], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="convserve-compare-") as scratch, ExitStack() as stack:
        folder = Path(scratch)
        servers = {}
        for i, (revision, label) in enumerate(zip(args.revisions, labels, strict=True)):
            checkout = _worktree(stack, revision, folder / f"checkout-{i}")
            log = folder / f"server-{i}.log"
            servers[label] = _serve(stack, checkout, args.model_repository, args.server_core, log)
        for server in servers.values():
            wait_until_serving(server)
        targets = {revision: server.target for revision, server in servers.items()}
        for repeat in range(args.repeats):  # every point, each revision in turn: A B C, A B C, ...
            for api in args.apis.split(","):
                for concurrency in args.concurrency.split(","):
                    for revision, target in targets.items():
                        out = folder / "point.json"
                        (row,) = _measure(target, api, args.model, concurrency, args.client_core, out)
                        key = (api, int(concurrency), revision)
                        rates.setdefault(key, []).append(row["requests_per_second"])
            print(f"repeat {repeat + 1} of {args.repeats} done", file=sys.stderr)

    first = labels[0]
    print(f"| API | concurrency | {' | '.join(labels)} | ratios to {first} |")
    print("|---|---|" + "---|" * len(labels) + "---|")
    for api in args.apis.split(","):
        for concurrency in (int(c) for c in args.concurrency.split(",")):
            got = {r: rates[(api, concurrency, r)] for r in labels}
            medians = {r: statistics.median(v) for r, v in got.items()}
            cells = " | ".join(f"{medians[r]:.0f} ({min(got[r]):.0f}-{max(got[r]):.0f})" for r in labels)
            ratios = ", ".join(f"{medians[r] / medians[first]:.2f}" for r in labels[1:])
            print(f"| {api} | {concurrency} | {cells} | {ratios} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
