"""The HTTP routes the console relies on, called as any client calls them, and how its files are served."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import RunningServer, start_server

from console.pages import LATENT, http, post_json
from service._proto.convserve.v1 import vision_pb2 as pb
from service.cli import build_parser
from service.client import VisionClient
from service.settings import Settings
from service.transports.http.routes import build_app

DIGIT = Path(__file__).resolve().parents[2] / "examples" / "digit-7.jpg"


def _get(url: str) -> dict:
    status, _, body = http(url)
    assert status == 200, body
    return json.loads(body)


def _access_lines(server: RunningServer) -> list[dict]:
    lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("logger") == "convserve.access"]


def test_the_model_list_says_what_list_models_says_on_grpc(console_server: RunningServer) -> None:
    listed = _get(f"{console_server.http_url}/v1/models")["models"]
    with VisionClient(console_server.target) as client:
        expected = client.list_models().models
    assert [m["name"] for m in listed] == [m.name for m in expected]
    for row, model in zip(listed, expected, strict=True):
        assert row["kind"] == model.kind
        assert row["labels"] == list(model.labels)
        states = [(v["version"], v["state"], v["provider"], v["reason"]) for v in row["versions"]]
        assert states == [(v.version, _state_name(v.state), v.provider, v.reason) for v in model.versions]
    lenet = next(m for m in listed if m["name"] == "lenet5")
    assert lenet["input"] == {"name": "image", "height": 32, "width": 32, "channels": 1, "color_mode": "L"}
    assert next(m for m in listed if m["name"] == "dcgan")["input"] is None
    assert next(m for m in listed if m["name"] == "broken")["versions"][0]["state"] == "FAILED"


def _state_name(state: int) -> str:
    return pb.ModelState.Name(state).removeprefix("MODEL_STATE_")


def test_recent_figures_show_the_last_minutes_requests(console_server: RunningServer) -> None:
    base = console_server.http_url
    for _ in range(4):
        assert http(f"{base}/v1/classify?model=scenes-resnet", DIGIT.read_bytes(), method="POST")[0] == 200
    assert http(f"{base}/v1/classify?model=scenes-resnet", b"no image", method="POST")[0] == 400
    row: dict = {}
    for _ in range(50):  # a second is reported once it is complete
        rows = _get(f"{base}/v1/models/recent")["models"]
        row = next(r for r in rows if r["name"] == "scenes-resnet")
        if row["requests"] >= 5 and row["failures"] >= 1:
            break
        time.sleep(0.1)
    assert row["requests"] >= 5 and row["failures"] >= 1, row
    assert row["window_seconds"] == 60 and len(row["per_second"]) == 60
    assert sum(row["per_second"]) == row["requests"]
    assert row["rate"] == round(row["requests"] / 60, 3)
    assert 0 < row["p50_seconds"] <= row["p99_seconds"]
    loaded = {"captioner", "captioner-butd", "dcgan", "lenet5", "scenes-resnet"}
    assert {r["name"] for r in rows} == loaded


def test_a_seeds_latents_generate_that_seeds_images(console_server: RunningServer) -> None:
    base = console_server.http_url
    answer = _get(f"{base}/v1/latents?model=dcgan&seed=5&count=2")
    assert (answer["model"], answer["version"], answer["seed"]) == ("dcgan", "1", 5)
    latents = np.asarray(answer["latents"], np.float32)
    expected = np.random.Generator(np.random.PCG64(5)).standard_normal((2, LATENT), dtype=np.float32)
    assert np.array_equal(latents, expected)  # float32 survives the JSON round trip exactly
    status, headers, from_seed = http(f"{base}/v1/generate?model=dcgan&seed=5&count=2&label=1", method="POST")
    assert status == 200
    body = json.dumps({"latents": answer["latents"]}).encode()
    json_type = {"Content-Type": "application/json"}
    status, headers, from_latents = http(f"{base}/v1/generate?model=dcgan&label=1", body, json_type, "POST")
    assert status == 200 and headers["x-labels"] == "1,1"
    assert from_latents == from_seed
    one = json.dumps({"latents": answer["latents"][1:]}).encode()
    _, _, single = http(f"{base}/v1/generate?model=dcgan&label=2", one, json_type, "POST")
    assert single[:8] == b"\x89PNG\r\n\x1a\n" and single != from_seed


@pytest.mark.parametrize(
    ("query", "body", "status", "message"),
    [
        ("model=dcgan", {"latents": [[0.5] * 3]}, 400, "latents have shape [1, 3]; this model takes 1 x 64"),
        ("model=dcgan", {"latents": [[0.5] * LATENT, [0.5]]}, 400, "equally long lists of numbers"),
        ("model=dcgan", {"latents": [["0.5"] * LATENT]}, 400, "equally long lists of numbers"),
        ("model=dcgan", {"latents": []}, 400, "non-empty list"),
        ("model=dcgan", {"latents": [[1e39] * LATENT]}, 400, "finite"),
        ("model=dcgan", {"latents": [[0.0] * LATENT], "seed": 1}, 400, 'one key, "latents"'),
        ("model=dcgan&count=2", {"latents": [[0.0] * LATENT]}, 400, "count is 2 but 1 latent vectors"),
        ("model=lenet5", {"latents": [[0.0] * LATENT]}, 400, "is a classifier, not a generator"),
        ("model=nonesuch", {"latents": [[0.0] * LATENT]}, 404, "nonesuch"),
    ],
)
def test_generate_refuses_latents_it_cannot_use(
    console_server: RunningServer, query: str, body: dict, status: int, message: str
) -> None:
    answer = post_json(f"{console_server.http_url}/v1/generate?{query}", body)
    assert answer[0] == status and message in answer[1]["error"], answer  # type: ignore[index]


def test_latents_are_checked_and_run_no_model(console_server: RunningServer) -> None:
    base = console_server.http_url

    def successes() -> int:
        return _get(f"{base}/v2/models/dcgan/stats")["model_stats"][0]["inference_stats"]["success"]["count"]

    before = successes()
    assert http(f"{base}/v1/latents?model=dcgan&seed=3")[0] == 200
    assert successes() == before  # not an inference: KServe statistics do not count it
    for query, status in (
        ("model=dcgan&seed=-1", 400),
        ("model=dcgan&count=0", 400),
        ("model=lenet5", 400),
        ("model=nonesuch", 404),
        ("model=dcgan&seed=x", 400),
    ):
        assert http(f"{base}/v1/latents?{query}")[0] == status, query
    fresh = _get(f"{base}/v1/latents?model=dcgan")
    assert fresh["seed"] >= 0 and len(fresh["latents"]) == 1  # no seed: a fresh one, named


def test_the_console_files_come_with_the_security_headers(console_server: RunningServer) -> None:
    base = console_server.http_url
    status, headers, page = http(f"{base}/")
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert b'<script type="module" src="console/main.js">' in page
    for path, content_type in (
        ("/console/main.js", "text/javascript; charset=utf-8"),
        ("/console/console.css", "text/css; charset=utf-8"),
        ("/console/scene-red-circle.png", "image/png"),
        ("/v2/health/live", "application/json"),  # the API's answers carry the headers too
    ):
        status, headers, _ = http(base + path)
        assert (status, headers["Content-Type"]) == (200, content_type), path
        policy = headers["Content-Security-Policy"]
        assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy
        assert headers["X-Content-Type-Options"] == "nosniff"
    for missing in (
        "/console/nothing.js",
        "/console/..%2Fopenapi.json",
        "/console/index.htm",
        "/console/index.html",
    ):
        assert http(base + missing)[0] == 404, missing


def test_console_files_and_successful_polls_are_neither_logged_nor_counted(
    console_server: RunningServer,
) -> None:
    base = console_server.http_url
    for path in ("/", "/console/main.js", "/v1/models", "/v1/models/recent"):
        assert http(base + path)[0] == 200
    marker = "/v2/models/lenet5/ready"
    assert http(base + marker)[0] == 200  # logged, and after the others
    for _ in range(100):  # the access log is written in blocks, a fraction of a second apart
        lines = _access_lines(console_server)
        if any(line["method"] == f"GET {marker}" for line in lines):
            break
        time.sleep(0.05)
    methods = {line["method"] for line in lines}
    assert f"GET {marker}" in methods
    assert not {"GET /", "GET /console/main.js", "GET /v1/models", "GET /v1/models/recent"} & methods
    status, _, scraped = http(console_server.metrics_url)
    assert status == 200
    counted = [line for line in scraped.decode().splitlines() if 'transport="http"' in line]
    for method in ("ListModels", "RecentStatistics", "ConsoleFile"):
        assert not [line for line in counted if f'method="{method}"' in line], method
    assert [line for line in counted if 'method="ModelReady"' in line]  # what is counted shows


def test_no_console_serves_no_page(model_repository: Path, tmp_path: Path) -> None:
    assert build_parser().parse_args(["serve", "--no-console"]).console is False
    assert build_parser().parse_args(["serve"]).console is None  # the setting's default: on
    assert Settings().console is True
    server = start_server(model_repository, tmp_path / "server.log", {"CONVSERVE_CONSOLE": "false"})
    try:
        assert http(f"{server.http_url}/")[0] == 404
        assert http(f"{server.http_url}/console/main.js")[0] == 404
        assert http(f"{server.http_url}/v1/models")[0] == 200  # the API stays
    finally:
        server.stop()
    routes = build_app(plane=None, max_body_bytes=1024, console=False).router.routes()  # type: ignore[arg-type]
    assert not [
        r for r in routes if r.resource is not None and r.resource.canonical in ("/", "/console/{file}")
    ]
