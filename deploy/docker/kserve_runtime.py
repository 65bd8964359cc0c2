"""How a KServe ServingRuntime starts its container, as arguments for `docker run` or `podman run`.

container-test.sh runs the image the way deploy/kserve/cluster-serving-runtime.yaml describes it,
read from the file rather than copied into the script, so the two cannot drift apart:

    python3 kserve_runtime.py RUNTIME.yaml options    # env and security, one run option a line
    python3 kserve_runtime.py RUNTIME.yaml args       # the container's args, one a line
    python3 kserve_runtime.py RUNTIME.yaml ports      # container ports: HTTP gRPC metrics
    python3 kserve_runtime.py RUNTIME.yaml readiness  # the readiness probe's HTTP path and port
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import yaml


def container(runtime: dict) -> dict:
    (only,) = [c for c in runtime["spec"]["containers"] if c["name"] == "kserve-container"]
    return only


def env_value(variable: dict, spec: dict) -> str:
    """A variable's value as the kubelet resolves it: literal, or a resource field (rounded up)."""
    if "value" in variable:
        return str(variable["value"])
    field = variable["valueFrom"]["resourceFieldRef"]
    kind, resource = field["resource"].split(".")
    quantity = str(spec["resources"][kind][resource])
    amount = int(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)
    return str(math.ceil(amount / float(field.get("divisor", "1"))))


def options(spec: dict) -> list[str]:
    found = [f"--env={v['name']}={env_value(v, spec)}" for v in spec.get("env", [])]
    security = spec.get("securityContext", {})
    if "runAsUser" in security:
        found.append(f"--user={security['runAsUser']}")
    if security.get("readOnlyRootFilesystem"):
        found.append("--read-only")
    if security.get("allowPrivilegeEscalation") is False:
        found.append("--security-opt=no-new-privileges")
    found += [f"--cap-drop={cap}" for cap in security.get("capabilities", {}).get("drop", [])]
    return found


def flag(args: list[str], name: str) -> str:
    (value,) = [a.split("=", 1)[1] for a in args if a.startswith(f"{name}=")]
    return value


def main(path: str, what: str) -> None:
    runtime = yaml.safe_load(Path(path).read_text())
    spec = container(runtime)
    if what == "options":
        print("\n".join(options(spec)))
    elif what == "args":
        print("\n".join(spec["args"]))
    elif what == "ports":
        metrics = runtime["spec"]["annotations"]["prometheus.kserve.io/port"]
        print(flag(spec["args"], "--http-port"), flag(spec["args"], "--grpc-port"), metrics)
    elif what == "readiness":
        probe = spec["readinessProbe"]["httpGet"]
        print(probe["path"], probe["port"])
    else:
        sys.exit(f"unknown: {what}")


if __name__ == "__main__":
    main(*sys.argv[1:])
