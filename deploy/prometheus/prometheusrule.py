"""Print deploy/prometheus/rules.yml as a prometheus-operator PrometheusRule.

The compose Prometheus loads rules.yml itself; Kubernetes clusters with prometheus-operator get the
same groups from deploy/k8s/components/monitoring/prometheusrule.yaml, which this writes:

    python3 deploy/prometheus/prometheusrule.py > deploy/k8s/components/monitoring/prometheusrule.yaml

tests/deploy checks that the two never drift apart.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

RULES = Path(__file__).with_name("rules.yml")
HEADER = """\
# Generated from deploy/prometheus/rules.yml by deploy/prometheus/prometheusrule.py (do not edit):
# edit rules.yml, then `python3 deploy/prometheus/prometheusrule.py > THIS_FILE`.
"""


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (alert descriptions) as literal blocks, as a person would write them."""


def _string(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _string)


def prometheus_rule(rules: dict) -> dict:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "convserve",
            "labels": {"app.kubernetes.io/name": "convserve", "app.kubernetes.io/component": "server"},
        },
        "spec": {"groups": rules["groups"]},
    }


def render() -> str:
    rules = yaml.safe_load(RULES.read_text())
    body = yaml.dump(prometheus_rule(rules), Dumper=_BlockDumper, sort_keys=False, width=120)
    return HEADER + body


if __name__ == "__main__":
    sys.stdout.write(render())
