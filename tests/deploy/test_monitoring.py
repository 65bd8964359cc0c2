"""deploy/prometheus and deploy/grafana: promtool's checks and rule unit tests, the Grafana
provisioning and dashboard, every metric they use exists on a real server, and a real Prometheus
scrapes a real server, loads the rules and answers the dashboard's queries."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import grpc
import numpy as np
import pytest
import yaml
from conftest import RunningServer, free_port

from service.client import VisionClient

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS = REPO / "deploy" / "prometheus"
GRAFANA = REPO / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "convserve.json"

T = TypeVar("T")

#: A metric name of the server (not a recorded `level:metric:operation` name).
METRIC = re.compile(r"(?<![\w:])convserve_\w+")


def system_tool(name: str) -> str:
    found = shutil.which(name)
    assert found, f"{name} is not installed: `make system-deps` (part of `make test`) installs it"
    return found


def promtool(*args: str) -> str:
    result = subprocess.run(
        [system_tool("promtool"), *args], capture_output=True, text=True, timeout=60, cwd=PROMETHEUS
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def load_rules() -> list[dict]:
    groups = yaml.safe_load((PROMETHEUS / "rules.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels(dashboard: dict) -> list[dict]:
    panels = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # collapsed rows keep their panels inside
    return [p for p in panels if p["type"] != "row"]


def dashboard_queries(dashboard: dict) -> list[str]:
    queries = [t["expr"] for panel in dashboard_panels(dashboard) for t in panel["targets"]]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            queries.append(query["query"] if isinstance(query, dict) else query)
    return queries


# --- Prometheus: configuration and rules -----------------------------------------------------------


def test_promtool_checks_the_configuration_and_the_rules_file_it_names() -> None:
    output = promtool("check", "config", "prometheus.yml")
    assert "SUCCESS: 1 rule files found" in output


def test_promtool_checks_the_rules() -> None:
    output = promtool("check", "rules", "rules.yml")
    assert f"SUCCESS: {len(load_rules())} rules found" in output


def test_promtool_rule_unit_tests_pass() -> None:
    """deploy/prometheus/rules_test.yml: the alerts fire on made-up series, and only when they should."""
    assert "SUCCESS" in promtool("test", "rules", "rules_test.yml")


def test_prometheus_scrapes_the_compose_service() -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    assert config["rule_files"] == ["rules.yml"]  # relative to prometheus.yml: mounted side by side
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "convserve"]
    assert job["static_configs"] == [{"targets": ["convserve:8002"]}]
    assert job.get("metrics_path", "/metrics") == "/metrics"


def test_the_rules_cover_errors_latency_queue_time_and_readiness() -> None:
    rules = load_rules()
    alerts = {rule["alert"]: rule for rule in rules if "alert" in rule}
    assert {
        "ConvserveHighErrorRatio",
        "ConvserveHighLatency",
        "ConvserveHighQueueTime",
        "ConvserveModelNotReady",
    } <= set(alerts)
    for rule in alerts.values():
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    records = {rule["record"] for rule in rules if "record" in rule}
    assert {
        "model:convserve_request_errors:ratio_rate5m",
        "model:convserve_request_duration_seconds:p99_rate5m",
        "model:convserve_queue_duration_seconds:p99_rate5m",
    } <= records


# --- Grafana: provisioning and the dashboard -------------------------------------------------------


def test_grafana_datasource_is_the_compose_prometheus() -> None:
    config = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (source,) = config["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    assert source["access"] == "proxy"
    assert source["uid"] == "prometheus"


def test_grafana_dashboard_provider_loads_the_dashboards_folder() -> None:
    config = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "convserve.yml").read_text())
    (provider,) = config["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"


def test_the_dashboard_is_well_formed() -> None:
    dashboard = load_dashboard()
    assert dashboard["uid"] == "convserve" and dashboard["title"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["datasource"]["current"]["value"] == "prometheus"  # the provisioned uid
    occupied: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        cells = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & occupied, f"panel {panel['title']!r} overlaps another"
        occupied |= cells
    for panel in dashboard_panels(dashboard):
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"]
            assert target["expr"].strip(), panel["title"]


def test_the_dashboard_shows_what_operators_need() -> None:
    panels = dashboard_panels(load_dashboard())

    def uses(metric: str, *words: str) -> bool:
        return any(
            metric in t["expr"] and all(w in t["expr"] for w in words) for p in panels for t in p["targets"]
        )

    assert uses("convserve_requests_total", "rate(")  # request rate
    assert uses("convserve_request_duration_seconds_bucket", "histogram_quantile(0.50")  # p50
    assert uses("convserve_request_duration_seconds_bucket", "histogram_quantile(0.99")  # p99
    assert uses("convserve_queue_duration_seconds_bucket")  # queue time
    assert uses("convserve_batch_size")  # batch size
    assert uses("convserve_requests_total", "by (model, code)", 'code!="OK"')  # errors by code
    assert uses("convserve_model_ready", "provider", "model")  # readiness and provider per model


# --- every metric named exists on a real server ----------------------------------------------------


def exposed_metric_names(metrics_url: str) -> set[str]:
    """Sample names on /metrics, plus those of declared metrics without samples yet (a labelled
    counter nobody has incremented): histograms as _bucket, _sum and _count, counters as _total."""
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    names = {
        line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")
    }
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names |= {
                "histogram": {f"{name}_bucket", f"{name}_sum", f"{name}_count"},
                "counter": {name if name.endswith("_total") else f"{name}_total"},
            }.get(kind, {name})
    return names


def send_traffic(server: RunningServer) -> None:
    """One good request (every histogram gets a sample) and one for a model that does not exist."""
    with VisionClient(server.target, timeout=10) as client:
        client.classify([np.zeros((32, 32), np.uint8)], model="lenet5")
        with pytest.raises(grpc.RpcError) as error:
            client.classify([np.zeros((32, 32), np.uint8)], model="no-such-model")
        assert error.value.code() is grpc.StatusCode.NOT_FOUND


def test_every_metric_the_dashboard_and_the_rules_use_exists(server: RunningServer) -> None:
    send_traffic(server)
    exposed = exposed_metric_names(server.metrics_url)
    assert "convserve_requests_total" in exposed and "convserve_batch_size_bucket" in exposed
    assert "convserve_requests" not in exposed  # counters are only ever _total: the check can fail
    used = {name for query in dashboard_queries(load_dashboard()) for name in METRIC.findall(query)}
    used |= {name for rule in load_rules() for name in METRIC.findall(rule["expr"])}
    assert len(used) >= 10, used
    assert used <= exposed, f"not on /metrics: {sorted(used - exposed)}"


# --- a real Prometheus ------------------------------------------------------------------------------


class Prometheus:
    def __init__(self, url: str, process: subprocess.Popen, log: Path) -> None:
        self.url, self.process, self.log = url, process, log

    def api(self, path: str, **params: str) -> dict:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=10) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]

    def wait_for(self, what: str, check: Callable[[], T], timeout: float = 30) -> T:
        deadline = time.monotonic() + timeout
        while True:
            assert self.process.poll() is None, f"prometheus exited:\n{self.log.read_text()}"
            value = check()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"prometheus: {what} not within {timeout} s; last answer: {value!r}")
            time.sleep(0.5)


@pytest.fixture(scope="module")
def prometheus(server: RunningServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    """Debian's Prometheus on a free port: deploy/prometheus/prometheus.yml with the session server's
    metrics port as the convserve target, scraped and evaluated every second, and rules.yml."""
    folder = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(PROMETHEUS / name) for name in config["rule_files"]]
    metrics_address = urllib.parse.urlsplit(server.metrics_url).netloc
    config["scrape_configs"] = [job for job in config["scrape_configs"] if job["job_name"] == "convserve"]
    config["scrape_configs"][0]["static_configs"] = [{"targets": [metrics_address]}]
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = folder / "prometheus.log"
    with open(log, "w") as output:
        process = subprocess.Popen(
            [
                system_tool("prometheus"),
                f"--config.file={folder / 'prometheus.yml'}",
                f"--storage.tsdb.path={folder / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    running = Prometheus(f"http://127.0.0.1:{port}", process, log)

    def ready() -> bool:
        try:
            return urllib.request.urlopen(f"{running.url}/-/ready", timeout=2).status == 200
        except OSError:
            return False

    try:
        running.wait_for("ready", ready)
        yield running
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_prometheus_scrapes_the_server(prometheus: Prometheus, server: RunningServer) -> None:
    send_traffic(server)

    def lenet5_requests() -> list:
        return prometheus.api("query", query='convserve_requests_total{job="convserve", model="lenet5"}')[
            "result"
        ]

    results = prometheus.wait_for("convserve_requests_total of lenet5", lenet5_requests)
    assert all(r["metric"]["job"] == "convserve" for r in results)
    assert sum(float(r["value"][1]) for r in results) >= 1
    (target,) = prometheus.api("targets")["activeTargets"]
    assert target["health"] == "up" and target["labels"]["job"] == "convserve"


def test_prometheus_loads_and_evaluates_the_rules(prometheus: Prometheus, server: RunningServer) -> None:
    expected = {rule.get("record") or rule.get("alert") for rule in load_rules()}

    def evaluated() -> dict[str, str]:
        rules = {r["name"]: r["health"] for g in prometheus.api("rules")["groups"] for r in g["rules"]}
        return rules if set(rules) == expected and all(h != "unknown" for h in rules.values()) else {}

    health = prometheus.wait_for("every rule evaluated", evaluated)
    assert all(h == "ok" for h in health.values()), health
    send_traffic(server)
    # a recording rule made from the server's own series (rate() needs two scrapes)
    prometheus.wait_for(
        "model:convserve_requests:rate5m of lenet5",
        lambda: prometheus.api("query", query='model:convserve_requests:rate5m{model="lenet5"}')["result"],
    )
    firing = [a["labels"]["alertname"] for a in prometheus.api("alerts")["alerts"] if a["state"] == "firing"]
    assert "ConvserveDown" not in firing


def test_prometheus_answers_every_dashboard_query(prometheus: Prometheus, server: RunningServer) -> None:
    """As Grafana would send them, with every job and model selected: valid PromQL, and data wherever
    the server has samples of each metric the query uses."""
    send_traffic(server)
    with_samples = {
        line.split("{")[0].split(" ")[0]
        for line in urllib.request.urlopen(server.metrics_url, timeout=10).read().decode().splitlines()
        if line and not line.startswith("#")
    }
    prometheus.wait_for(  # two scrapes of the good request, for rate()
        "two samples",
        lambda: prometheus.api("query", query="count_over_time(convserve_requests_total[1m]) > 1")["result"],
    )
    dashboard = load_dashboard()
    for panel in dashboard_panels(dashboard):
        for target in panel["targets"]:
            query = target["expr"].replace("$job", ".*").replace("$model", ".*")
            query = query.replace("$__rate_interval", "1m")
            assert "$" not in query, f"{panel['title']}: a variable this test does not know: {query}"
            result = prometheus.api("query", query=query)["result"]
            # failures (server errors, load failures) may not have happened: those may be empty
            may_be_empty = 'code=~"UNAVAILABLE' in query or "increase(" in query
            if set(METRIC.findall(query)) <= with_samples and not may_be_empty:
                assert result, f"{panel['title']}: no data for {query}"
