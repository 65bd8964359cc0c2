"""deploy/kserve: the ClusterServingRuntime and the example InferenceServices validate against KServe's
CRD schemas (a pinned release, strict: a field KServe does not know is an error), and describe the
server as it really runs: its flags, ports, settings, probe and metrics port.

`make container-test` then runs the image exactly as the runtime describes it."""

from __future__ import annotations

import gzip
import json
import math
from functools import cache
from pathlib import Path

import jsonschema
import pytest
import yaml

from service import __version__
from service.cli import build_parser
from service.settings import Settings

REPO = Path(__file__).resolve().parents[2]
KSERVE = REPO / "deploy" / "kserve"
SCHEMAS = Path(__file__).parent / "kserve" / "crd-schemas.json.gz"
RUNTIME = KSERVE / "cluster-serving-runtime.yaml"
INFERENCE_SERVICES = sorted(KSERVE.glob("inferenceservice-*.yaml"))
HTTP_PORT, GRPC_PORT, METRICS_PORT = 8080, 8081, 8002


@cache
def crd_schemas() -> dict[str, dict]:
    return json.loads(gzip.decompress(SCHEMAS.read_bytes()))


def strict(schema: dict) -> dict:
    """A CRD's structural schema as JSON Schema that rejects unknown fields, as `kubectl apply
    --validate=strict` does (the API server would otherwise drop them silently)."""
    schema = dict(schema)
    if schema.get("x-kubernetes-int-or-string") and "anyOf" not in schema:
        schema["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if schema.get("nullable") and "type" in schema:
        schema["type"] = [schema["type"], "null"]
    if "properties" in schema:
        schema["properties"] = {key: strict(value) for key, value in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
    if isinstance(schema.get("additionalProperties"), dict):
        schema["additionalProperties"] = strict(schema["additionalProperties"])
    if "items" in schema:
        schema["items"] = strict(schema["items"])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in schema:
            schema[key] = [strict(option) for option in schema[key]]
    return schema


def validation_errors(document: dict) -> list[str]:
    """Every way `document` breaks its kind's CRD schema; empty when it is valid."""
    group_version, kind = document.get("apiVersion", ""), document.get("kind", "")
    schema = crd_schemas().get(f"{group_version}/{kind}")
    assert schema is not None, f"no KServe schema for {group_version} {kind}"
    validator = jsonschema.Draft7Validator(strict(schema))
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


def load(path: Path) -> dict:
    (document,) = [d for d in yaml.safe_load_all(path.read_text()) if d]
    return document


def runtime_container() -> dict:
    (container,) = load(RUNTIME)["spec"]["containers"]
    return container


def test_the_schemas_are_a_pinned_kserve_release() -> None:
    assert crd_schemas()["_release"]["kserve"].startswith("v0.")
    assert {
        "serving.kserve.io/v1alpha1/ClusterServingRuntime",
        "serving.kserve.io/v1beta1/InferenceService",
    } <= set(crd_schemas())


@pytest.mark.parametrize("path", [RUNTIME, *INFERENCE_SERVICES], ids=lambda p: p.name)
def test_the_manifests_follow_kserves_crd_schemas(path: Path) -> None:
    errors = validation_errors(load(path))
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize(
    ("path", "where", "misspelt"),
    [
        (RUNTIME, ("spec",), "protocolVersion"),  # the field is protocolVersions
        (RUNTIME, ("spec", "containers", 0), "arg"),
        (INFERENCE_SERVICES[0], ("spec", "predictor", "model"), "storageURI"),
    ],
)
def test_the_schema_check_rejects_a_misspelt_field(path: Path, where: tuple, misspelt: str) -> None:
    document = load(path)
    node = document
    for key in where:
        node = node[key]
    node[misspelt] = ["x"]
    assert any(misspelt in error for error in validation_errors(document))


def test_the_runtime_serves_convserve_repositories_over_both_v2_protocols() -> None:
    runtime = load(RUNTIME)
    assert runtime["kind"] == "ClusterServingRuntime" and runtime["metadata"]["name"] == "convserve"
    formats = {f["name"]: f for f in runtime["spec"]["supportedModelFormats"]}
    assert formats["convserve"]["autoSelect"] is True
    assert not formats["onnx"].get("autoSelect", False)  # Triton keeps ONNX models unless asked
    assert runtime["spec"]["protocolVersions"] == ["v2", "grpc-v2"]
    annotations = runtime["spec"]["annotations"]
    assert annotations["prometheus.kserve.io/port"] == str(METRICS_PORT)
    assert annotations["prometheus.kserve.io/path"] == "/metrics"


def runtime_settings(monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The server's settings in the runtime's container: its env, then its args as `convserve serve`
    parses them (flags win over the environment, as in the CLI)."""
    container = runtime_container()
    for key in list(Settings.model_fields):
        monkeypatch.delenv(f"CONVSERVE_{key.upper()}", raising=False)
    for variable in container["env"]:
        if "value" in variable:
            value = variable["value"]
        else:
            field = variable["valueFrom"]["resourceFieldRef"]
            assert field["containerName"] == container["name"]
            kind, resource = field["resource"].split(".")
            value = str(math.ceil(float(container["resources"][kind][resource])))
        monkeypatch.setenv(variable["name"], value)
    known = {f"CONVSERVE_{field.upper()}" for field in Settings.model_fields}
    names = {v["name"] for v in container["env"]}
    assert names <= known, f"unknown settings: {names - known}"
    args = build_parser().parse_args(["serve", *container["args"]])
    flags = {key: value for key, value in vars(args).items() if key != "command" and value is not None}
    return Settings(**flags)


def test_the_runtime_runs_the_server_on_kserves_ports(monkeypatch: pytest.MonkeyPatch) -> None:
    container = runtime_container()
    assert container["name"] == "kserve-container"  # the name KServe merges the model's spec into
    assert "command" not in container  # the image's entrypoint, `convserve serve`
    assert container["image"] == f"convserve:{__version__}-nomodels"
    settings = runtime_settings(monkeypatch)
    assert settings.model_repository == Path("/mnt/models")  # where the storage initializer puts it
    assert (settings.http_port, settings.grpc_port, settings.metrics_port) == (
        HTTP_PORT,
        GRPC_PORT,
        METRICS_PORT,
    )
    assert settings.repository_control == "disabled"
    assert settings.repository_poll_seconds == 0
    assert settings.min_models >= 1  # an empty download never goes ready
    assert settings.intra_op_threads == math.ceil(float(container["resources"]["limits"]["cpu"]))


def test_the_runtime_probes_readiness_over_http() -> None:
    """An explicit probe: the queue-proxy's default TCP check would pass as soon as the port opens."""
    container = runtime_container()
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": HTTP_PORT}
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": HTTP_PORT}


def test_the_runtime_container_meets_the_restricted_profile() -> None:
    context = runtime_container()["securityContext"]
    assert context["runAsNonRoot"] is True and context["runAsUser"] != 0
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    assert context["seccompProfile"]["type"] == "RuntimeDefault"
    assert context["readOnlyRootFilesystem"] is True


@pytest.mark.parametrize("path", INFERENCE_SERVICES, ids=lambda p: p.name)
def test_the_inference_services_use_the_runtime(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    isvc = load(path)
    runtime = load(RUNTIME)
    model = isvc["spec"]["predictor"]["model"]
    formats = {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert model["modelFormat"]["name"] in formats
    assert model.get("runtime", "convserve") == runtime["metadata"]["name"]
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    assert model["storageUri"].rstrip("/").endswith("/convserve")  # the repository root, not a model
    for variable in model.get("env", []):
        monkeypatch.setenv(variable["name"], variable["value"])
    assert Settings().min_models == 4  # the four default models, or never ready
    annotations = isvc["metadata"]["annotations"]
    assert annotations["serving.kserve.io/enable-prometheus-scraping"] == "true"
    assert not isvc["metadata"]["name"].startswith("convserve")  # its Services' env would be CONVSERVE_*


def test_raw_deployment_exposes_http_and_grpc() -> None:
    (raw,) = [load(p) for p in INFERENCE_SERVICES if "raw" in p.name]
    assert raw["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
    ports = raw["spec"]["predictor"]["model"]["ports"]
    # KServe maps the first port to the Service's port 80, the others as they are; "grpc" marks h2c
    assert [p["containerPort"] for p in ports] == [HTTP_PORT, GRPC_PORT]
    assert "grpc" in ports[1]["name"]
    assert raw["spec"]["predictor"]["minReplicas"] >= 2


def test_serverless_declares_one_port_per_protocol() -> None:
    """Knative routes exactly one port: HTTP/1 to 8080 for v2, h2c to 8081 for grpc-v2."""
    serverless = [load(p) for p in INFERENCE_SERVICES if "serverless" in p.name]
    assert {s["spec"]["predictor"]["model"]["protocolVersion"] for s in serverless} == {"v2", "grpc-v2"}
    for isvc in serverless:
        assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Serverless"
        model = isvc["spec"]["predictor"]["model"]
        (port,) = model["ports"]
        if model["protocolVersion"] == "grpc-v2":
            assert port == {"name": "h2c", "containerPort": GRPC_PORT, "protocol": "TCP"}
        else:
            assert port == {"name": "http1", "containerPort": HTTP_PORT, "protocol": "TCP"}
