"""Every code block of README.md and docs/ runs as written, against a live server.

The blocks run from a working folder laid out like the repository after `make serve`: every
top-level entry of the repository (linked), `.venv`, and `models/` with every default model
(quickly trained here). A server on the default ports 8000, 8001 and 8002 serves that repository
(so those ports must be free), with the default settings but `CONVSERVE_REPOSITORY_CONTROL=enabled`
for the examples of load and unload.

- `bash` blocks run with `bash -e -o pipefail` and must exit 0; a block of `make` commands only
  is checked with `make --dry-run` (the targets set up .venv, train at full quality, serve in the
  foreground, or run this very suite);
- `python` blocks run with this virtual environment's Python and must exit 0;
- `text`, `yaml` and `json` blocks are shown, not run; a block without a language fails;
- a block marked on the line before it, `<!-- not run: needs docker|a cluster|a GPU: why -->`,
  is reported as skipped with that reason. No other mark is accepted.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import RunningServer, wait_until_serving

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
RUN = {"bash": "bash", "python": "python"}
SHOWN = {"text", "yaml", "json"}
DEFAULT_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}
FENCE = re.compile(r"^(?P<indent> *)```(?P<language>[^\s`]*)\s*$")
MARK = re.compile(r"^ *<!-- not run: needs (?P<need>docker|a cluster|a GPU): (?P<why>\S.{9,}?) -->$")
#: Entries of the repository the working folder does not link: made by the run, or private.
NOT_LINKED = {".git", ".venv", "models", "runs", "build", "bench-results"}


@dataclass(frozen=True)
class Block:
    page: str
    line: int  # of the opening fence, 1-based
    language: str
    code: str
    mark: str | None  # the line before the fence when it is a mark, or looks like one

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


def blocks_of(path: Path) -> list[Block]:
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, start = opening["indent"], i
        i += 1
        body = []
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][len(indent) :] if lines[i].startswith(indent) else lines[i].lstrip())
            i += 1
        previous = lines[start - 1].strip() if start > 0 else ""
        mark = previous if previous.startswith("<!--") and "not run" in previous else None
        name = path.relative_to(REPO).as_posix()
        blocks.append(Block(name, start + 1, opening["language"], "\n".join(body) + "\n", mark))
        i += 1
    return blocks


BLOCKS = [block for page in PAGES for block in blocks_of(page)]
RUNNABLE = [block for block in BLOCKS if block.language in RUN]


def make_only(code: str) -> list[str] | None:
    """The command lines of a block of `make` commands only, comments dropped; None otherwise."""
    commands = [line.split("#", 1)[0].strip() for line in code.splitlines()]
    commands = [c for c in commands if c]
    return commands if commands and all(c == "make" or c.startswith("make ") for c in commands) else None


def test_every_block_says_what_it_is_and_marks_are_well_formed() -> None:
    problems = []
    for block in BLOCKS:
        if block.language not in RUN and block.language not in SHOWN:
            problems.append(f"{block.id}: language {block.language!r}; say one of {sorted({*RUN, *SHOWN})}")
        if block.mark and not MARK.match(block.mark):
            problems.append(
                f"{block.id}: {block.mark!r} is not `<!-- not run: needs docker|a cluster|a GPU: why -->`"
            )
        if block.mark and block.language not in RUN:
            problems.append(f"{block.id}: a mark on a block that would not run anyway")
    assert not problems, "\n".join(problems)
    assert len(RUNNABLE) >= 20  # the parser finds the blocks (README alone has several)


def test_make_only_blocks_are_told_apart() -> None:
    assert make_only("make serve   # serve\nmake ORT=cpu test\n") == ["make serve", "make ORT=cpu test"]
    assert make_only("make serve\n.venv/bin/convserve health\n") is None
    assert make_only("# nothing\n") is None


def free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


@pytest.fixture(scope="module")
def docs_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every default model, quickly trained: the commands need them all, not their quality."""
    folder = tmp_path_factory.mktemp("docs-models")
    train = Path(sys.executable).parent / "convserve-train"
    done = subprocess.run(
        [str(train), "all", "--quick", "--no-progress", "--repository", str(folder / "models"),
         "--runs", str(folder / "runs")],
        capture_output=True, text=True, timeout=900, cwd=folder,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return folder / "models"


@pytest.fixture(scope="module")
def workdir(docs_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder like the repository after `make serve`, where the blocks may write what they make."""
    folder = tmp_path_factory.mktemp("docs-workdir")
    for entry in REPO.iterdir():
        if (
            entry.name not in NOT_LINKED
            and not entry.name.endswith(".egg-info")
            and not entry.name.startswith(".")
        ):
            (folder / entry.name).symlink_to(entry)
    (folder / ".venv").symlink_to(Path(sys.executable).parents[1])
    (folder / "models").symlink_to(docs_models)
    return folder


@pytest.fixture(scope="module")
def live_server(docs_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """`convserve serve` on the default ports, as `make serve` runs it, with repository control on."""
    busy = [f"{name} {port}" for name, port in DEFAULT_PORTS.items() if not free(port)]
    assert not busy, f"the documentation's examples use the default ports; busy here: {', '.join(busy)}"
    log_path = tmp_path_factory.mktemp("docs-server") / "server.log"
    env = {**os.environ, "CONVSERVE_REPOSITORY_CONTROL": "enabled"}
    command = [sys.executable, "-m", "service", "serve", "--model-repository", str(docs_models)]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    server = RunningServer(
        process,
        f"127.0.0.1:{DEFAULT_PORTS['grpc']}",
        f"http://127.0.0.1:{DEFAULT_PORTS['metrics']}/metrics",
        log_path,
        f"http://127.0.0.1:{DEFAULT_PORTS['http']}",
    )
    try:
        wait_until_serving(server, timeout=120)
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize("block", RUNNABLE, ids=lambda block: block.id)
def test_block_runs(block: Block, workdir: Path, live_server: RunningServer) -> None:
    if block.mark:
        match = MARK.match(block.mark)
        assert match, f"malformed mark {block.mark!r}"
        pytest.skip(f"{block.id} needs {match['need']}: {match['why']}")
    commands = make_only(block.code) if block.language == "bash" else None
    if commands is not None:
        for command in commands:
            dry = subprocess.run(
                ["make", "--dry-run", *command.split()[1:]],
                cwd=workdir,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert dry.returncode == 0, f"{command}\n{dry.stdout}{dry.stderr}"
        return
    if block.language == "bash":
        argv = ["bash", "-e", "-o", "pipefail", "-c", block.code]
    else:
        script = workdir / f"block-{block.page.replace('/', '-')}-{block.line}.py"
        script.write_text(block.code)
        argv = [sys.executable, str(script)]
    done = subprocess.run(argv, cwd=workdir, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (
        f"{block.id} failed (exit {done.returncode}):\n{block.code}\n--- stdout\n{done.stdout[-3000:]}"
        f"\n--- stderr\n{done.stderr[-3000:]}\n--- server log (end)\n{live_server.log()[-2000:]}"
    )


def test_the_working_folder_is_the_repository_with_models(workdir: Path) -> None:
    assert (workdir / "examples" / "scene.png").is_file() and (workdir / "Makefile").is_file()
    assert sorted(p.name for p in (workdir / "models").iterdir()) == [
        "captioner",
        "captioner-butd",
        "dcgan",
        "lenet5",
        "scenes-resnet",
    ]
    assert shutil.which("convserve", path=str(workdir / ".venv" / "bin"))
    assert os.access(workdir / ".venv" / "bin" / "python", os.X_OK)


# --- docs/api.md's table of every route and RPC -----------------------------------------------------

ROUTE_TABLE = "### Every route and RPC, and how each differs from Triton"
#: The service of the table's bare RPC names (its first column's heading).
DEFAULT_SERVICE = "inference.GRPCInferenceService"
METHOD_PATH = re.compile(r"^(?P<method>GET|POST|PUT|DELETE|HEAD) (?P<path>/\S*)$")


def _optional(path: str) -> list[str]:
    """Every path `[...]` spells, without and with each optional part: `/a[/b[/c]]` is /a, /a/b, /a/b/c."""
    start = path.find("[")
    if start < 0:
        return [path]
    depth = 0
    for end in range(start, len(path)):
        depth += {"[": 1, "]": -1}.get(path[end], 0)
        if depth == 0:
            break
    head, inner, tail = path[:start], path[start + 1 : end], path[end + 1 :]
    return _optional(head + tail) + _optional(head + inner + tail)


def _route(method: str, path: str) -> tuple[str, str]:
    return method, re.sub(r"\{[^}]*\}", "{}", path)  # {v} and {version} are one route


def documented_routes_and_rpcs() -> tuple[set[tuple[str, str]], set[tuple[str, str]], set[str]]:
    """The table's HTTP routes on the HTTP port, those on the metrics port, and its gRPC methods."""
    text = (REPO / "docs" / "api.md").read_text()
    assert ROUTE_TABLE in text, f"docs/api.md lost its heading {ROUTE_TABLE!r}"
    rows = []
    for line in text.split(ROUTE_TABLE, 1)[1].splitlines()[1:]:
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split(" | ")])
        elif rows:
            break
    http, metrics, rpcs = set(), set(), set()
    for grpc_cell, http_cell, _ in rows[2:]:  # past the heading and the |---| line
        service = DEFAULT_SERVICE
        for name in re.findall(r"`([^`]+)`", grpc_cell):
            if "/" in name and not name.startswith("/"):
                service, name = name.rsplit("/", 1)
            rpcs.add(f"{service}/{name.lstrip('/')}")
        routes = metrics if "metrics port" in http_cell else http
        method = ""
        for item in re.findall(r"`([^`]+)`", http_cell):
            found = METHOD_PATH.match(item)
            assert found or (method and item.startswith("/")), f"not `METHOD /path` nor `/path`: {item!r}"
            method, path = (found["method"], found["path"]) if found else (method, item)
            routes.update(_route(method, each) for each in _optional(path))
    return http, metrics, rpcs


def _registered(app) -> set[tuple[str, str]]:
    return {_route(r.method, r.resource.canonical) for r in app.router.routes() if r.method != "HEAD"}


def test_the_route_table_lists_every_http_route_and_rpc_the_server_has() -> None:
    """docs/api.md's table against what the server registers: every route of the HTTP app (console
    on) and of the metrics port, every RPC of protos/, health and reflection; nothing more."""
    from grpc_health.v1 import health_pb2
    from grpc_reflection.v1alpha import reflection_pb2

    from service.server import metrics_app
    from service.transports.http.routes import build_app

    http, metrics, rpcs = documented_routes_and_rpcs()
    assert http == _registered(build_app(None, max_body_bytes=1024, console=True))  # type: ignore[arg-type]
    assert metrics == _registered(metrics_app(None))
    served = set()
    for proto in sorted((REPO / "protos").rglob("*.proto")):
        source = proto.read_text()
        package = re.search(r"^package ([\w.]+);", source, re.MULTILINE)[1]
        for service, body in re.findall(r"^service (\w+) \{(.*?)^\}", source, re.MULTILINE | re.DOTALL):
            served.update(f"{package}.{service}/{rpc}" for rpc in re.findall(r"\brpc (\w+)\s*\(", body))
    assert "inference.GRPCInferenceService/ModelInfer" in served  # the parser reads the protos
    for descriptor, name in ((health_pb2, "Health"), (reflection_pb2, "ServerReflection")):
        service = descriptor.DESCRIPTOR.services_by_name[name]
        served.update(f"{service.full_name}/{method.name}" for method in service.methods)
    assert rpcs == served


def test_optional_parts_of_a_documented_path_are_spelled_out() -> None:
    assert _optional("/v2/models[/{name}[/versions/{v}]]/stats") == [
        "/v2/models/stats",
        "/v2/models/{name}/stats",
        "/v2/models/{name}/versions/{v}/stats",
    ]
