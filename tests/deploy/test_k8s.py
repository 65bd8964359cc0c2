"""deploy/k8s: every kustomization renders, validates against the Kubernetes schemas, meets the Pod
Security "restricted" profile, and fits the server (ports, health entries, settings, drain time)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from service.settings import Settings

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
OVERLAYS = sorted(f"overlays/{path.parent.name}" for path in (K8S / "overlays").glob("*/kustomization.yaml"))
KUSTOMIZATIONS = ["base", *OVERLAYS]
PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}
#: overlays/tls: the plaintext health-only port the probes use (the gRPC port speaks TLS).
HEALTH_PORT = 8003


def container_ports(name: str) -> dict[str, int]:
    return {**PORTS, "grpc-health": HEALTH_PORT} if name == "overlays/tls" else PORTS


def probe_port(name: str) -> int:
    return HEALTH_PORT if name == "overlays/tls" else PORTS["grpc"]


#: The oldest Kubernetes the manifests are for (the preStop sleep action is on by default from 1.30)
#: and the newest kubernetes-validate knows.
KUBERNETES_VERSIONS = ["1.30.0", "1.37.0"]


def tool(name: str) -> str:
    """A command from the virtual environment running the tests, else from PATH; never a skip."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    assert found, f"{name} is not installed: `make test` installs it (make install, make system-deps)"
    return found


def kustomize(name: str) -> str:
    result = subprocess.run(
        [tool("kubectl"), "kustomize", str(K8S / name)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"kubectl kustomize {name} failed:\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each kustomization's output, written to a file."""
    folder = tmp_path_factory.mktemp("kustomize")
    files = {}
    for name in KUSTOMIZATIONS:
        files[name] = folder / f"{name.replace('/', '-')}.yaml"
        files[name].write_text(kustomize(name))
    return files


def resources(rendered: dict[str, Path], name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(rendered[name].read_text()) if doc]


def only(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def test_there_is_a_base_and_a_gpu_overlay() -> None:
    assert "overlays/gpu" in KUSTOMIZATIONS
    assert (K8S / "base" / "kustomization.yaml").is_file()


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_kustomization_is_valid_kubernetes(rendered: dict[str, Path], version: str) -> None:
    """kubernetes-validate --strict: unknown fields and wrong types fail; custom resources only warn."""
    result = subprocess.run(
        [
            tool("kubernetes-validate"),
            "--strict",
            "--kubernetes-version",
            version,
            *map(str, rendered.values()),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    for name, path in rendered.items():
        for doc in resources(rendered, name):
            if doc["kind"] != "ServiceMonitor":
                assert f"{path} passed for resource {doc['kind'].lower()}/{doc['metadata']['name']}" in output


def test_kubernetes_validate_strict_rejects_an_unknown_field(tmp_path: Path) -> None:
    """The check above can fail: a misspelt field is an error, not a warning."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "apiVersion: v1\nkind: Service\nmetadata: {name: x}\n"
        "spec: {selector: {a: b}, ports: [{port: 1, targetPrt: 1}]}\n"
    )
    result = subprocess.run(
        [tool("kubernetes-validate"), "--strict", str(bad)], capture_output=True, text=True
    )
    assert result.returncode != 0
    assert "targetPrt" in result.stdout + result.stderr


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_the_kinds_of_resources(rendered: dict[str, Path], name: str) -> None:
    kinds = sorted(doc["kind"] for doc in resources(rendered, name))
    assert kinds == sorted(
        [
            "ConfigMap",
            "Deployment",
            "HorizontalPodAutoscaler",
            "PodDisruptionBudget",
            "Service",
            "Service",
            "ServiceMonitor",
        ]
    )


def pod_specs(docs: list[dict]) -> list[dict]:
    """Every pod template: Deployments, StatefulSets, DaemonSets, Jobs, and bare Pods."""
    specs = []
    for doc in docs:
        if doc["kind"] == "Pod":
            specs.append(doc["spec"])
        elif doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
            specs.append(doc["spec"]["template"]["spec"])
        elif doc["kind"] == "CronJob":
            specs.append(doc["spec"]["jobTemplate"]["spec"]["template"]["spec"])
    return specs


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_pods_meet_the_restricted_pod_security_standard(rendered: dict[str, Path], name: str) -> None:
    """The "restricted" profile's checks (kubernetes.io/docs/concepts/security/pod-security-standards),
    which kubernetes-validate does not make, plus a read-only root filesystem."""
    specs = pod_specs(resources(rendered, name))
    assert specs
    for spec in specs:
        pod = spec.get("securityContext", {})
        assert not (spec.get("hostNetwork") or spec.get("hostPID") or spec.get("hostIPC"))
        for volume in spec.get("volumes", []):
            kinds = set(volume) - {"name"}
            assert kinds <= {
                "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                "persistentVolumeClaim", "projected", "secret",
            }, f"volume {volume['name']}: {kinds} not allowed by the restricted profile"  # fmt: skip
        assert pod.get("runAsUser", 1) != 0
        for container in spec.get("initContainers", []) + spec["containers"]:
            where = f"{name}: container {container['name']}"
            ctx = container.get("securityContext", {})
            # runAsNonRoot: true on the container, or on the pod and not turned off by the container
            assert ctx.get("runAsNonRoot", pod.get("runAsNonRoot")) is True, where
            assert ctx.get("runAsUser", pod.get("runAsUser", 1)) != 0, where
            assert ctx.get("allowPrivilegeEscalation") is False, where
            assert not ctx.get("privileged", False), where
            capabilities = ctx.get("capabilities", {})
            assert "ALL" in capabilities.get("drop", []), where
            assert set(capabilities.get("add", [])) <= {"NET_BIND_SERVICE"}, where
            seccomp = ctx.get("seccompProfile", pod.get("seccompProfile", {}))
            assert seccomp.get("type") in ("RuntimeDefault", "Localhost"), where
            assert ctx.get("readOnlyRootFilesystem") is True, where
            assert all("hostPort" not in port for port in container.get("ports", [])), where


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_the_server_container(rendered: dict[str, Path], name: str) -> None:
    docs = resources(rendered, name)
    deployment = only(docs, "Deployment", "convserve")
    spec = deployment["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert container["image"] == ("convserve:gpu" if name == "overlays/gpu" else "convserve:cpu")
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == container_ports(name)
    # the only writable place: an emptyDir at /tmp
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert "/tmp" in mounts
    (tmp,) = [v for v in spec["volumes"] if v["name"] == mounts["/tmp"]]
    assert "emptyDir" in tmp
    assert container["resources"]["requests"]["cpu"] and container["resources"]["requests"]["memory"]
    assert container["resources"]["limits"]["memory"]
    # a Service named convserve would otherwise inject CONVSERVE_SERVICE_HOST, CONVSERVE_PORT, ...
    assert spec["enableServiceLinks"] is False
    assert spec["automountServiceAccountToken"] is False


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_probes_use_the_grpc_health_entries(rendered: dict[str, Path], name: str) -> None:
    """Readiness on the overall entry; liveness on the "liveness" entry, which a pod still loading its
    models already answers SERVING, behind a startup probe: warming up never gets a pod killed."""
    (container,) = only(resources(rendered, name), "Deployment")["spec"]["template"]["spec"]["containers"]
    readiness, liveness, startup = (container[p] for p in ("readinessProbe", "livenessProbe", "startupProbe"))
    assert readiness["grpc"] == {"port": probe_port(name), "service": ""}
    assert liveness["grpc"] == {"port": probe_port(name), "service": "liveness"}
    assert startup["grpc"] == {"port": probe_port(name), "service": "liveness"}
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 60


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_settings_come_from_a_config_map_and_are_real_settings(
    rendered: dict[str, Path], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every key is a CONVSERVE_* setting the server knows (a misspelt one would be ignored silently)."""
    docs = resources(rendered, name)
    config = only(docs, "ConfigMap")
    (container,) = only(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert {"configMapRef": {"name": config["metadata"]["name"]}} in container["envFrom"]
    known = {f"CONVSERVE_{field.upper()}" for field in Settings.model_fields}
    data = config["data"]
    assert set(data) <= known, f"unknown settings: {set(data) - known}"
    for key in list(Settings.model_fields):
        monkeypatch.delenv(f"CONVSERVE_{key.upper()}", raising=False)
    for key, value in data.items():
        monkeypatch.setenv(key, value)
    settings = Settings()  # the values parse
    assert settings.model_repository == Path("/models")
    assert (settings.http_port, settings.grpc_port, settings.metrics_port) == tuple(PORTS.values())
    assert settings.require_gpu is (name == "overlays/gpu")
    assert settings.max_connection_age_seconds > 0


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_termination_grace_covers_the_drain(rendered: dict[str, Path], name: str) -> None:
    """SIGTERM comes after the preStop sleep; then the server drains for CONVSERVE_SHUTDOWN_GRACE_SECONDS
    and closes its sessions: Kubernetes must not SIGKILL it before that."""
    docs = resources(rendered, name)
    spec = only(docs, "Deployment")["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain = float(only(docs, "ConfigMap")["data"]["CONVSERVE_SHUTDOWN_GRACE_SECONDS"])
    assert spec["terminationGracePeriodSeconds"] >= pre_stop + drain + 5


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_services_select_the_pods_and_expose_named_ports(rendered: dict[str, Path], name: str) -> None:
    docs = resources(rendered, name)
    pod_labels = only(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    cluster_ip = only(docs, "Service", "convserve")
    headless = only(docs, "Service", "convserve-headless")
    assert cluster_ip["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert headless["spec"]["clusterIP"] == "None"
    for service in (cluster_ip, headless):
        assert service["spec"]["selector"].items() <= pod_labels.items()
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in PORTS and port["port"] == PORTS[port["targetPort"]]
    assert {p["name"] for p in cluster_ip["spec"]["ports"]} == set(PORTS)
    assert "grpc" in {p["name"] for p in headless["spec"]["ports"]}


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_service_monitor_selects_the_service_and_its_metrics_port(
    rendered: dict[str, Path], name: str
) -> None:
    """Exactly one Service matches (the headless one would scrape every pod twice), and the endpoint's
    port name exists on it and leads to the metrics port."""
    docs = resources(rendered, name)
    monitor = only(docs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    selector = monitor["spec"]["selector"]
    assert set(selector) == {"matchLabels"}, "only matchLabels is checked here"
    selected = [
        doc
        for doc in docs
        if doc["kind"] == "Service" and selector["matchLabels"].items() <= doc["metadata"]["labels"].items()
    ]
    assert [s["metadata"]["name"] for s in selected] == ["convserve"]
    ports = {p["name"]: p for p in selected[0]["spec"]["ports"]}
    assert monitor["spec"]["endpoints"]
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in ports, f"no port named {endpoint['port']} on the Service"
        assert ports[endpoint["port"]]["targetPort"] == "metrics"
        assert endpoint.get("path", "/metrics") == "/metrics"


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_autoscaler_and_disruption_budget(rendered: dict[str, Path], name: str) -> None:
    docs = resources(rendered, name)
    deployment = only(docs, "Deployment")
    hpa = only(docs, "HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "convserve"}
    assert 2 <= hpa["minReplicas"] <= hpa["maxReplicas"]
    metrics = {m["type"]: m for m in hpa["metrics"]}
    assert metrics["Resource"]["resource"]["name"] == "cpu"
    if name == "overlays/queue-autoscaling":
        assert metrics["Pods"]["pods"]["metric"]["name"] == "convserve_pending_requests"
    pdb = only(docs, "PodDisruptionBudget")["spec"]
    assert (
        pdb["selector"]["matchLabels"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    )
    assert pdb.get("maxUnavailable") == 1 or pdb.get("minAvailable", hpa["minReplicas"]) < hpa["minReplicas"]


def test_the_gpu_overlay_asks_for_a_gpu_node(rendered: dict[str, Path]) -> None:
    spec = only(resources(rendered, "overlays/gpu"), "Deployment")["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert spec["nodeSelector"]
    base = only(resources(rendered, "base"), "Deployment")["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in base["containers"][0]["resources"]["limits"]
    assert "tolerations" not in base and "nodeSelector" not in base


def test_the_tls_overlay_mounts_the_secret_and_probes_the_plaintext_health_port(
    rendered: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """TLS settings name files in the mounted Secret; the probes use the health port the settings open."""
    from service.server import health_port, tls_enabled

    docs = resources(rendered, "overlays/tls")
    data = only(docs, "ConfigMap")["data"]
    spec = only(docs, "Deployment")["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    (volume,) = [v for v in spec["volumes"] if "secret" in v]
    assert mounts[volume["name"]]["readOnly"] is True
    folder = mounts[volume["name"]]["mountPath"]
    files = {f"{folder}/{item['path']}" for item in volume["secret"]["items"]}
    keys = ("CONVSERVE_TLS_CERT_FILE", "CONVSERVE_TLS_KEY_FILE", "CONVSERVE_TLS_CLIENT_CA_FILE")
    assert {data[key] for key in keys} == files
    for key in list(Settings.model_fields):
        monkeypatch.delenv(f"CONVSERVE_{key.upper()}", raising=False)
    for key, value in data.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert tls_enabled(settings)
    assert health_port(settings) == HEALTH_PORT == container["readinessProbe"]["grpc"]["port"]
    for service in (d for d in docs if d["kind"] == "Service"):  # probes only: no Service exposes it
        assert HEALTH_PORT not in {port["port"] for port in service["spec"]["ports"]}
    base = only(resources(rendered, "base"), "ConfigMap")["data"]
    assert not any(key.startswith("CONVSERVE_TLS") for key in base)
