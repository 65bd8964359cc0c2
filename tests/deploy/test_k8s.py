"""deploy/k8s: the base alone, the base with each component, and every example combination render,
validate against the Kubernetes schemas, meet the Pod Security "restricted" profile, and fit the
server (ports, health entries, settings, threads, drain time, autoscaling, access)."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from service import __version__
from service.settings import Settings

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
COMPONENTS = sorted(path.parent.name for path in (K8S / "components").glob("*/kustomization.yaml"))
EXAMPLES = sorted(path.parent.name for path in (K8S / "examples").glob("*/kustomization.yaml"))
#: Components that exclude each other: two autoscalers, two sources of models.
EXCLUSIVE = [{"autoscale-queue", "autoscale-keda"}, {"models-volume", "models-init"}]
#: Kinds kubernetes-validate has no schema for (their CRDs are not part of Kubernetes).
CUSTOM_KINDS = {"ServiceMonitor", "PrometheusRule", "ScaledObject"}
PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}
#: components/tls: the plaintext health-only port the probes use (the gRPC port speaks TLS).
HEALTH_PORT = 8003
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


def components_of(name: str) -> list[str]:
    """`base`, `base+COMPONENT`, or `examples/NAME` (whose kustomization lists its components)."""
    if name.startswith("examples/"):
        kustomization = yaml.safe_load((K8S / name / "kustomization.yaml").read_text())
        return [Path(path).name for path in kustomization.get("components", [])]
    return name.split("+")[1:]


def kustomize(name: str, folder: Path) -> str:
    """Render an example, or the base with components through a kustomization written in `folder`."""
    if name.startswith("examples/"):
        root = K8S / name
    else:
        root = folder / name.replace("+", "-")
        root.mkdir()
        relative = Path(os.path.relpath(K8S, root))  # kustomize takes no absolute paths
        root.joinpath("kustomization.yaml").write_text(
            yaml.safe_dump(
                {
                    "resources": [str(relative / "base")],
                    "components": [str(relative / "components" / c) for c in components_of(name)],
                }
            )
        )
    result = subprocess.run(
        [tool("kubectl"), "kustomize", str(root)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"kubectl kustomize {name} failed:\n{result.stderr}"
    return result.stdout


KUSTOMIZATIONS = ["base", *(f"base+{c}" for c in COMPONENTS), *(f"examples/{e}" for e in EXAMPLES)]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each kustomization's output, written to a file."""
    folder = tmp_path_factory.mktemp("kustomize")
    files = {}
    for name in KUSTOMIZATIONS:
        files[name] = folder / f"{name.replace('/', '-').replace('+', '-')}.yaml"
        files[name].write_text(kustomize(name, folder))
    return files


def resources(rendered: dict[str, Path], name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(rendered[name].read_text()) if doc]


def only(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def server_container(docs: list[dict]) -> dict:
    (container,) = only(docs, "Deployment", "convserve")["spec"]["template"]["spec"]["containers"]
    return container


def settings_of(docs: list[dict], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The server's settings as the pod gets them: the ConfigMap, then the container's own env."""
    for key in list(Settings.model_fields):
        monkeypatch.delenv(f"CONVSERVE_{key.upper()}", raising=False)
    for key, value in only(docs, "ConfigMap")["data"].items():
        monkeypatch.setenv(key, value)
    container = server_container(docs)
    for variable in container.get("env", []):
        if variable["name"].startswith("CONVSERVE_"):
            monkeypatch.setenv(variable["name"], str(resolved_env(variable, container)))
    return Settings()


def resolved_env(variable: dict, container: dict) -> str:
    """An env entry's value as the kubelet resolves it (literal values and resource fields)."""
    if "value" in variable:
        return variable["value"]
    field = variable["valueFrom"]["resourceFieldRef"]
    kind, resource = field["resource"].split(".")
    quantity = str(container["resources"][kind][resource])
    cores = int(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)
    return str(math.ceil(cores / float(field.get("divisor", "1"))))  # the kubelet rounds up


def test_the_components_and_examples_are_there() -> None:
    assert set(COMPONENTS) >= {
        "gpu", "tls", "tokens", "network-policy", "monitoring",
        "autoscale-queue", "autoscale-keda", "models-volume", "models-init",
    }  # fmt: skip
    assert EXAMPLES, "deploy/k8s/examples holds the documented combinations"


def test_the_examples_cover_every_component_and_combine_no_exclusive_ones() -> None:
    used = set()
    for example in EXAMPLES:
        components = components_of(f"examples/{example}")
        used.update(components)
        for pair in EXCLUSIVE:
            assert len(pair & set(components)) <= 1, f"{example} combines {pair}"
        if "gpu" in components and "autoscale-queue" in components:
            # the later component's patch of the HPA wins: gpu's (the queue only) must come last
            assert components.index("gpu") > components.index("autoscale-queue"), example
    assert used == set(COMPONENTS)
    assert "everything" in EXAMPLES  # the largest combination that may go together


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
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    for name, path in rendered.items():
        for doc in resources(rendered, name):
            if doc["kind"] not in CUSTOM_KINDS:
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
    components = set(components_of(name))
    expected = ["ConfigMap", "Deployment", "PodDisruptionBudget", "Service", "Service"]
    expected.append("ScaledObject" if "autoscale-keda" in components else "HorizontalPodAutoscaler")
    if "monitoring" in components:
        expected += ["ServiceMonitor", "PrometheusRule"]
    if "network-policy" in components:
        expected.append("NetworkPolicy")
    if "models-volume" in components:
        expected.append("PersistentVolumeClaim")
    assert sorted(doc["kind"] for doc in resources(rendered, name)) == sorted(expected)


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
            assert container["resources"]["limits"]["memory"], where


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_the_server_container(rendered: dict[str, Path], name: str) -> None:
    docs = resources(rendered, name)
    deployment = only(docs, "Deployment", "convserve")
    spec = deployment["spec"]["template"]["spec"]
    container = server_container(docs)
    gpu = "gpu" in components_of(name)
    # a release's tag, never a moving one (latest, cpu, gpu)
    assert container["image"] == f"convserve:{__version__}{'-gpu' if gpu else ''}"
    ports = {**PORTS, "grpc-health": HEALTH_PORT} if "tls" in components_of(name) else PORTS
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == ports
    # the only writable place: an emptyDir at /tmp
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    (tmp,) = [v for v in spec["volumes"] if v["name"] == mounts["/tmp"]["name"]]
    assert "emptyDir" in tmp
    assert all(m.get("readOnly") for path, m in mounts.items() if path != "/tmp")
    assert container["resources"]["requests"]["cpu"] and container["resources"]["requests"]["memory"]
    assert container["resources"]["limits"]["memory"]
    # a Service named convserve would otherwise inject CONVSERVE_SERVICE_HOST, CONVSERVE_PORT, ...
    assert spec["enableServiceLinks"] is False
    assert spec["automountServiceAccountToken"] is False


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_no_replica_count_beside_the_autoscaler(rendered: dict[str, Path], name: str) -> None:
    """Every apply or GitOps sync would otherwise scale a scaled-out Deployment back to it."""
    assert "replicas" not in only(resources(rendered, name), "Deployment")["spec"]


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_intra_op_threads_follow_the_cpu_limit(
    rendered: dict[str, Path], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Threads per session = the container's CPU limit, through the downward API, not a literal that
    ignores it (and not onnxruntime's default of a thread per core of the node)."""
    docs = resources(rendered, name)
    container = server_container(docs)
    (threads,) = [v for v in container["env"] if v["name"] == "CONVSERVE_INTRA_OP_THREADS"]
    field = threads["valueFrom"]["resourceFieldRef"]
    assert field == {"containerName": container["name"], "resource": "limits.cpu", "divisor": "1"}
    assert "CONVSERVE_INTRA_OP_THREADS" not in only(docs, "ConfigMap")["data"]  # env would win anyway
    limit = float(str(container["resources"]["limits"]["cpu"]).rstrip("m"))
    assert settings_of(docs, monkeypatch).intra_op_threads == math.ceil(limit) >= 1


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_probes_use_the_grpc_health_entries(rendered: dict[str, Path], name: str) -> None:
    """Readiness on the overall entry; liveness on the "liveness" entry, which a pod still loading its
    models already answers SERVING, behind a startup probe: warming up never gets a pod killed."""
    container = server_container(resources(rendered, name))
    port = HEALTH_PORT if "tls" in components_of(name) else PORTS["grpc"]
    readiness, liveness, startup = (container[p] for p in ("readinessProbe", "livenessProbe", "startupProbe"))
    assert readiness["grpc"] == {"port": port, "service": ""}
    assert liveness["grpc"] == {"port": port, "service": "liveness"}
    assert startup["grpc"] == {"port": port, "service": "liveness"}
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 60


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_settings_come_from_a_config_map_and_are_real_settings(
    rendered: dict[str, Path], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every key is a CONVSERVE_* setting the server knows (a misspelt one would be ignored silently),
    and the values hold in production: no model control over the network, a readiness guard."""
    docs = resources(rendered, name)
    config = only(docs, "ConfigMap")
    assert {"configMapRef": {"name": config["metadata"]["name"]}} in server_container(docs)["envFrom"]
    known = {f"CONVSERVE_{field.upper()}" for field in Settings.model_fields}
    assert set(config["data"]) <= known, f"unknown settings: {set(config['data']) - known}"
    settings = settings_of(docs, monkeypatch)  # the values parse
    components = components_of(name)
    assert settings.model_repository == Path("/models")
    assert (settings.http_port, settings.grpc_port, settings.metrics_port) == tuple(PORTS.values())
    assert settings.require_gpu is ("gpu" in components)
    assert settings.repository_control == "disabled"
    assert settings.min_models == 4  # the default repository's models: fewer never go ready
    assert settings.max_connection_age_seconds > 0
    models_change = "models-volume" in components
    assert (settings.repository_poll_seconds > 0) is models_change  # polled only where models arrive


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_termination_grace_covers_the_drain(rendered: dict[str, Path], name: str) -> None:
    """SIGTERM comes after the preStop sleep; then the server drains for CONVSERVE_SHUTDOWN_GRACE_SECONDS
    and closes its sessions: Kubernetes must not SIGKILL it before that."""
    docs = resources(rendered, name)
    spec = only(docs, "Deployment")["spec"]["template"]["spec"]
    pre_stop = server_container(docs)["lifecycle"]["preStop"]["sleep"]["seconds"]
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
            assert port["port"] != HEALTH_PORT  # the probes' plaintext port is never exposed
    assert {p["name"] for p in cluster_ip["spec"]["ports"]} == set(PORTS)
    assert "grpc" in {p["name"] for p in headless["spec"]["ports"]}


@pytest.mark.parametrize("name", [n for n in KUSTOMIZATIONS if "monitoring" in components_of(n)])
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


def test_the_prometheus_rule_is_the_rules_file_prometheus_loads() -> None:
    """components/monitoring's PrometheusRule is generated from deploy/prometheus/rules.yml, and current."""
    generator = REPO / "deploy" / "prometheus" / "prometheusrule.py"
    result = subprocess.run([sys.executable, str(generator)], capture_output=True, text=True, check=True)
    committed = K8S / "components" / "monitoring" / "prometheusrule.yaml"
    assert committed.read_text() == result.stdout, f"stale: run {generator.relative_to(REPO)} > {committed}"
    rules = yaml.safe_load((REPO / "deploy" / "prometheus" / "rules.yml").read_text())
    assert yaml.safe_load(committed.read_text())["spec"]["groups"] == rules["groups"]


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_autoscaler_and_disruption_budget(rendered: dict[str, Path], name: str) -> None:
    docs = resources(rendered, name)
    components = components_of(name)
    deployment = only(docs, "Deployment")
    target = {"apiVersion": "apps/v1", "kind": "Deployment", "name": "convserve"}
    if "autoscale-keda" in components:  # KEDA's own HPA only: two autoscalers would fight
        scaled = only(docs, "ScaledObject")["spec"]
        assert scaled["scaleTargetRef"] == target
        minimum = scaled["minReplicaCount"]
        assert 2 <= minimum <= scaled["maxReplicaCount"]
        (trigger,) = scaled["triggers"]
        assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
        assert "convserve_pending_requests{" in trigger["metadata"]["query"]
        assert float(trigger["metadata"]["threshold"]) > 0
    else:
        hpa = only(docs, "HorizontalPodAutoscaler")["spec"]
        assert hpa["scaleTargetRef"] == target
        minimum = hpa["minReplicas"]
        assert 2 <= minimum <= hpa["maxReplicas"]
        metrics = {m["type"]: m for m in hpa["metrics"]}
        assert len(metrics) == len(hpa["metrics"])
        if "gpu" in components:
            assert set(metrics) == {"Pods"}  # CPU use says little about a GPU's load
        elif "autoscale-queue" in components:
            assert set(metrics) == {"Resource", "Pods"}
        else:
            assert set(metrics) == {"Resource"}
        if "Resource" in metrics:
            assert metrics["Resource"]["resource"]["name"] == "cpu"
        if "Pods" in metrics:
            assert metrics["Pods"]["pods"]["metric"]["name"] == "convserve_pending_requests"
    pdb = only(docs, "PodDisruptionBudget")["spec"]
    assert (
        pdb["selector"]["matchLabels"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    )
    assert pdb.get("maxUnavailable") == 1 or pdb.get("minAvailable", minimum) < minimum


def test_the_prometheus_adapter_rule_serves_the_metric_the_hpa_reads(rendered: dict[str, Path]) -> None:
    from service.observability import metrics

    values = yaml.safe_load(
        (K8S / "components" / "autoscale-queue" / "prometheus-adapter-values.yaml").read_text()
    )
    served = {rule["name"]["as"]: rule for rule in values["rules"]["custom"]}
    for name in ("base+autoscale-queue", "base+gpu"):
        hpa = only(resources(rendered, name), "HorizontalPodAutoscaler")["spec"]
        for metric in (m["pods"]["metric"]["name"] for m in hpa["metrics"] if m["type"] == "Pods"):
            rule = served[metric]
            assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
            series = rule["seriesQuery"].strip("'").split("{")[0]
            assert series == metrics.PENDING._name  # a metric the server really exports


@pytest.mark.parametrize("name", [n for n in KUSTOMIZATIONS if "gpu" in components_of(n)])
def test_the_gpu_component_asks_for_a_gpu_node_and_needs_no_spare_one(
    rendered: dict[str, Path], name: str
) -> None:
    deployment = only(resources(rendered, name), "Deployment")
    spec = deployment["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert spec["nodeSelector"] and spec["runtimeClassName"] == "nvidia"
    rolling = deployment["spec"]["strategy"]["rollingUpdate"]
    assert rolling["maxSurge"] == 0 and rolling["maxUnavailable"] == 1  # no pod waits for a spare GPU


def test_the_base_asks_for_no_gpu(rendered: dict[str, Path]) -> None:
    spec = only(resources(rendered, "base"), "Deployment")["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in spec["containers"][0]["resources"]["limits"]
    assert not {"tolerations", "nodeSelector", "runtimeClassName"} & set(spec)


@pytest.mark.parametrize("name", [n for n in KUSTOMIZATIONS if "tls" in components_of(n)])
def test_the_tls_component_mounts_the_secret_and_probes_the_plaintext_health_port(
    rendered: dict[str, Path], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TLS settings name files in the mounted Secret; the probes use the health port the settings open."""
    from service.security.tls import tls_enabled
    from service.server import health_port

    docs = resources(rendered, name)
    data = only(docs, "ConfigMap")["data"]
    spec = only(docs, "Deployment")["spec"]["template"]["spec"]
    container = server_container(docs)
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    (volume,) = [v for v in spec["volumes"] if v.get("secret", {}).get("secretName") == "convserve-tls"]
    assert mounts[volume["name"]]["readOnly"] is True
    folder = mounts[volume["name"]]["mountPath"]
    files = {f"{folder}/{item['path']}" for item in volume["secret"]["items"]}
    keys = ("CONVSERVE_TLS_CERT_FILE", "CONVSERVE_TLS_KEY_FILE", "CONVSERVE_TLS_CLIENT_CA_FILE")
    assert {data[key] for key in keys} == files
    settings = settings_of(docs, monkeypatch)
    assert tls_enabled(settings)
    assert health_port(settings) == HEALTH_PORT == container["readinessProbe"]["grpc"]["port"]
    base = only(resources(rendered, "base"), "ConfigMap")["data"]
    assert not any(key.startswith("CONVSERVE_TLS") for key in base)


@pytest.mark.parametrize("name", [n for n in KUSTOMIZATIONS if "tokens" in components_of(n)])
def test_the_tokens_component_reads_the_tokens_from_a_mounted_secret(
    rendered: dict[str, Path], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = resources(rendered, name)
    spec = only(docs, "Deployment")["spec"]["template"]["spec"]
    container = server_container(docs)
    settings = settings_of(docs, monkeypatch)
    assert settings.auth_tokens_file is not None
    assert not settings.auth_tokens.get_secret_value()  # never an environment variable
    (volume,) = [v for v in spec["volumes"] if v.get("secret", {}).get("secretName") == "convserve-tokens"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    assert mount["readOnly"] is True
    files = {Path(mount["mountPath"]) / item["path"] for item in volume["secret"]["items"]}
    assert settings.auth_tokens_file in files
    assert not settings.auth_health  # the probes need no token


@pytest.mark.parametrize("name", [n for n in KUSTOMIZATIONS if "network-policy" in components_of(n)])
def test_the_network_policy_opens_the_api_to_clients_and_metrics_to_monitoring_only(
    rendered: dict[str, Path], name: str
) -> None:
    docs = resources(rendered, name)
    policy = only(docs, "NetworkPolicy")["spec"]
    pod_labels = only(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    assert policy["egress"] == []  # the server opens no connections
    container_ports = {p["name"] for p in server_container(docs)["ports"]}
    opened: dict[str, list[dict]] = {}
    for rule in policy["ingress"]:
        assert rule["from"] and all(set(peer) == {"namespaceSelector"} for peer in rule["from"])
        for port in rule["ports"]:
            assert port["port"] in container_ports
            opened.setdefault(port["port"], []).extend(rule["from"])
    assert set(opened) == {"http", "grpc", "metrics"}  # not the health port: kubelet needs no rule
    assert (
        opened["http"]
        == opened["grpc"]
        == [{"namespaceSelector": {"matchLabels": {"convserve-client": "true"}}}]
    )
    monitoring = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    assert opened["metrics"] == [monitoring]


@pytest.mark.parametrize(
    "name", [n for n in KUSTOMIZATIONS if {"models-volume", "models-init"} & set(components_of(n))]
)
def test_models_come_from_a_volume_mounted_read_only_at_the_repository(
    rendered: dict[str, Path], name: str
) -> None:
    docs = resources(rendered, name)
    spec = only(docs, "Deployment")["spec"]["template"]["spec"]
    (mount,) = [m for m in server_container(docs)["volumeMounts"] if m["mountPath"] == "/models"]
    assert mount["readOnly"] is True
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    if "models-volume" in components_of(name):
        claim = volume["persistentVolumeClaim"]
        assert claim["readOnly"] is True
        only(docs, "PersistentVolumeClaim", claim["claimName"])
    else:  # an init container fills an emptyDir from the models image before the server starts
        assert "emptyDir" in volume
        (init,) = spec["initContainers"]
        (target,) = [m for m in init["volumeMounts"] if m["name"] == volume["name"]]
        assert init["command"][:2] == ["cp", "-R"] and init["command"][-1] == target["mountPath"] + "/"
        assert init["image"] == f"convserve-models:{__version__}"
