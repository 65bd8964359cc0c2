"""Write crd-schemas.json.gz: the OpenAPI schemas of KServe's ClusterServingRuntime and
InferenceService CRDs at one release, without their descriptions (most of their size).

test_kserve_runtime.py validates deploy/kserve against these, so the check runs offline and does not
move when KServe releases. To pin another release (needs network access to GitHub):

    python3 tests/deploy/kserve/update_crd_schemas.py v0.20.0

or from CRD files at hand: `python3 tests/deploy/kserve/update_crd_schemas.py v0.20.0 FILE.yaml...`.
"""

from __future__ import annotations

import gzip
import json
import sys
import urllib.request
from pathlib import Path

import yaml

OUT = Path(__file__).with_name("crd-schemas.json.gz")
CRDS = ("serving.kserve.io_clusterservingruntimes.yaml", "serving.kserve.io_inferenceservices.yaml")
URL = "https://raw.githubusercontent.com/kserve/kserve/{release}/config/crd/full/{name}"


def without_descriptions(node: object) -> object:
    if isinstance(node, dict):
        return {key: without_descriptions(value) for key, value in node.items() if key != "description"}
    if isinstance(node, list):
        return [without_descriptions(value) for value in node]
    return node


def schemas(crd: dict) -> dict[str, dict]:
    """`group/version/Kind` -> the openAPIV3Schema of each served version."""
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    return {
        f"{group}/{version['name']}/{kind}": without_descriptions(version["schema"]["openAPIV3Schema"])
        for version in crd["spec"]["versions"]
        if version.get("served", True)
    }


def main(release: str, files: list[str]) -> None:
    texts = [Path(f).read_text() for f in files] or [
        urllib.request.urlopen(URL.format(release=release, name=name), timeout=60).read().decode()
        for name in CRDS
    ]
    found: dict[str, dict] = {"_release": {"kserve": release}}
    for text in texts:
        found.update(schemas(yaml.safe_load(text)))
    data = json.dumps(found, sort_keys=True, separators=(",", ":")).encode()
    OUT.write_bytes(gzip.compress(data, mtime=0))
    print(f"{OUT.name}: {', '.join(sorted(found))}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
