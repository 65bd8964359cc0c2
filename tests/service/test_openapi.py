"""The HTTP API's OpenAPI document: served as shipped, checked in under docs/, and fuzzed clean.

schemathesis generates requests for every operation from the document and checks that every
answer conforms to the document (status code, content type, body schema). The document allows
503 and 504 where the server may answer them (a model not ready, a deadline) and 500 nowhere, so
a server error fails the run; the server's log must show no internal error either. The server is
a dedicated one: repository control off, messages capped at 1 MiB, a trained lenet5 and a toy
generator named dcgan.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import RunningServer, start_server
from tests.toy_models import toy_generator, write_config

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "service" / "transports" / "http" / "openapi.json"
CHECKED_IN = ROOT / "docs" / "openapi.json"
#: Generated requests per operation; the run takes about 20 s on 2 cores.
EXAMPLES = 60
CHECKS = "status_code_conformance,content_type_conformance,response_schema_conformance"


@pytest.fixture(scope="module")
def fuzzed_server(trained_lenet: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    repository = tmp_path_factory.mktemp("openapi") / "models"
    shutil.copytree(trained_lenet, repository)
    toy_generator(repository / "dcgan" / "1" / "model.onnx", latent=64)
    write_config(
        repository / "dcgan",
        {
            "name": "dcgan",
            "kind": "generator",
            "labels": ["zero", "one", "two"],
            "generator": {"latent_size": 64, "height": 8, "width": 8},
        },
    )
    env = {"CONVSERVE_REPOSITORY_CONTROL": "disabled", "CONVSERVE_MAX_MESSAGE_BYTES": str(1024 * 1024)}
    server = start_server(repository, repository.parent / "server.log", env)
    yield server
    server.stop()


def test_the_served_document_is_the_checked_in_one(fuzzed_server: RunningServer) -> None:
    with urllib.request.urlopen(f"{fuzzed_server.http_url}/openapi.json", timeout=10) as answer:
        assert answer.headers["Content-Type"] == "application/json"
        served = json.load(answer)
    assert served == json.loads(SHIPPED.read_text()) == json.loads(CHECKED_IN.read_text()), (
        "docs/openapi.json must be a copy of service/transports/http/openapi.json"
    )
    assert served["openapi"].startswith("3.")


def test_every_route_is_in_the_document() -> None:
    from service.transports.http.routes import build_app

    app = build_app(plane=None, max_body_bytes=1024)  # type: ignore[arg-type]  # routes only
    routes = {
        (route.method.lower(), route.resource.canonical)
        for route in app.router.routes()
        if route.resource is not None and route.method != "HEAD"
    }
    document = json.loads(SHIPPED.read_text())["paths"]
    described = {(method, path) for path, operations in document.items() for method in operations}
    assert routes == described


def test_schemathesis_finds_no_server_error_and_no_answer_off_the_document(
    fuzzed_server: RunningServer, tmp_path: Path
) -> None:
    schemathesis = Path(sys.executable).with_name("st")
    command = [
        str(schemathesis), "run", f"{fuzzed_server.http_url}/openapi.json",
        "--checks", CHECKS,
        "--max-examples", str(EXAMPLES),
        "--phases", "examples,coverage,fuzzing",
        "--seed", "1",
        "--request-timeout", "20",
        "--workers", "1",
        "--no-color",
        "--report", "junit", "--report-dir", str(tmp_path),
    ]  # fmt: skip
    env = {**os.environ, "SCHEMATHESIS_HOOKS": ""}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert done.returncode == 0, (
        f"{done.stdout[-8000:]}\n{done.stderr[-2000:]}\n--- server log\n" + (fuzzed_server.log()[-3000:])
    )
    assert "INTERNAL" not in fuzzed_server.log(), "a request reached an internal error"
