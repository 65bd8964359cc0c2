"""docker-compose.yml against the Compose specification, the Dockerfiles through hadolint, and the
compose file mounting deploy/prometheus and deploy/grafana where they expect to be."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILES = sorted((REPO / "deploy" / "docker").glob("*Dockerfile"))


def tool(name: str) -> str:
    """A command from the virtual environment running the tests, else from PATH; never a skip."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    assert found, f"{name} is not installed: `make test` installs it (the dev extra)"
    return found


def run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO)


def validate_compose(path: Path) -> subprocess.CompletedProcess[str]:
    """check-jsonschema with the Compose specification's schema that it bundles (no network)."""
    return run(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path))


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_file_follows_the_compose_specification() -> None:
    result = validate_compose(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_validation_can_fail(tmp_path: Path) -> None:
    bad = tmp_path / "docker-compose.yml"
    bad.write_text("services:\n  server:\n    image: convserve:cpu\n    portz: ['8001:8001']\n")
    result = validate_compose(bad)
    assert result.returncode != 0
    assert "portz" in result.stdout + result.stderr


def test_there_is_a_dockerfile() -> None:
    assert REPO / "deploy" / "docker" / "Dockerfile" in DOCKERFILES


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_dockerfile_passes_hadolint(dockerfile: Path) -> None:
    result = run(tool("hadolint"), "--no-color", str(dockerfile.relative_to(REPO)))
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_can_fail(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian:latest\nRUN cd /tmp && make\n")
    result = run(tool("hadolint"), "--no-color", str(bad))
    assert result.returncode != 0
    assert "DL3007" in result.stdout and "DL3003" in result.stdout


def mounts(service: dict) -> dict[PurePosixPath, PurePosixPath]:
    """Bind mounts of a compose service: container path -> host path (relative to the repository)."""
    found = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
        else:
            source, target = volume.get("source", ""), volume["target"]
        if source.startswith("."):
            found[PurePosixPath(target)] = PurePosixPath(source).relative_to(".")
        # named volumes are not files of the repository
    return found


def container_file(service: dict, host_path: str) -> PurePosixPath:
    """Where a file of the repository appears in a service's container (a file or a folder mount)."""
    wanted = PurePosixPath(host_path)
    for target, source in mounts(service).items():
        if wanted == source:
            return target
        if source in wanted.parents:
            return target / wanted.relative_to(source)
    raise AssertionError(f"{host_path} is not mounted in the container: {service.get('volumes')}")


def test_compose_prometheus_reads_the_config_and_rules_side_by_side() -> None:
    services = compose()["services"]
    prometheus = services["prometheus"]
    config = container_file(prometheus, "deploy/prometheus/prometheus.yml")
    rules = container_file(prometheus, "deploy/prometheus/rules.yml")
    assert rules == config.parent / "rules.yml"  # prometheus.yml names rules.yml relative to itself
    command = prometheus.get("command", [])
    flags = [
        f
        for f in (command if isinstance(command, list) else command.split())
        if f.startswith("--config.file")
    ]
    assert flags in ([], [f"--config.file={config}"])  # the image's default is /etc/prometheus/prometheus.yml
    if not flags:
        assert config == PurePosixPath("/etc/prometheus/prometheus.yml")
    # the scrape target convserve:8002 is the compose service and its metrics port
    ports = {str(p).split(":")[-1] for p in services["convserve"].get("ports", [])}
    assert "8002" in ports or "8002" in {str(p) for p in services["convserve"].get("expose", [])}


def test_compose_grafana_gets_the_provisioning_and_the_dashboards() -> None:
    grafana = compose()["services"]["grafana"]
    assert container_file(grafana, "deploy/grafana/provisioning/datasources/prometheus.yml") == PurePosixPath(
        "/etc/grafana/provisioning/datasources/prometheus.yml"
    )
    assert container_file(grafana, "deploy/grafana/provisioning/dashboards/convserve.yml") == PurePosixPath(
        "/etc/grafana/provisioning/dashboards/convserve.yml"
    )
    assert container_file(grafana, "deploy/grafana/dashboards/convserve.json") == PurePosixPath(
        "/var/lib/grafana/dashboards/convserve.json"
    )
    assert "prometheus" in compose()["services"]  # http://prometheus:9090 of the datasource


def test_compose_builds_images_of_its_own() -> None:
    """`docker compose up` builds dev tags, never a release's (which a cluster pulls with models baked
    in) nor a moving one such as latest, cpu or gpu."""
    services = compose()["services"]
    images = {name: services[name]["image"] for name in ("convserve", "convserve-gpu", "trainer")}
    defaults = {name: re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", image) for name, image in images.items()}
    assert defaults == {
        "convserve": "convserve:dev",
        "convserve-gpu": "convserve:dev-gpu",
        "trainer": "convserve-trainer:dev",
    }
    for name in images:
        assert services[name]["build"]["dockerfile"] == "deploy/docker/Dockerfile"


def test_bind_mounts_are_relabelled_for_selinux() -> None:
    """`z`: on SELinux hosts (Fedora, RHEL) a container may read a host file only once it is relabelled."""
    for name, service in compose()["services"].items():
        for volume in service.get("volumes", []):
            source, _target, *options = volume.split(":")
            if source.startswith("."):
                assert {"z", "Z"} & set(",".join(options).split(",")), f"{name}: {volume}"


def test_the_trainer_publishes_into_the_volume_the_server_polls() -> None:
    services = compose()["services"]
    trainer, server = services["trainer"], services["convserve"]
    shared = {v.split(":")[0]: v.split(":")[1] for v in server["volumes"]}
    trained = {v.split(":")[0]: v.split(":")[1] for v in trainer["volumes"]}
    assert shared["models"] == trained["models"] == "/models"
    shell, flag, script = trainer["entrypoint"]
    assert (shell, flag) == ("sh", "-c") and trainer["command"] == []
    assert script.startswith("exec convserve-train all --missing") and "--repository /models" in script
    # TRAIN_ARGS (e.g. "--quick --only lenet5") reaches the container, where its shell splits it
    assert script.endswith(" $$TRAIN_ARGS") and trainer["environment"]["TRAIN_ARGS"] == "${TRAIN_ARGS:-}"
    assert "CONVSERVE_REPOSITORY_POLL_SECONDS" not in server.get("environment", {})  # polling on: the default
