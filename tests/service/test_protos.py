"""The generated code in service/_proto matches protos/ (`make protos` after editing a .proto)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "tools" / "gen_protos.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_code_has_not_drifted(tmp_path) -> None:
    _load_generator().generate(tmp_path)
    committed = ROOT / "service" / "_proto"
    fresh = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    current = {
        p.relative_to(committed): p.read_bytes()
        for p in committed.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert sorted(fresh) == sorted(current), "files differ: run `make protos`"
    stale = [str(name) for name in fresh if fresh[name] != current[name]]
    assert not stale, f"generated code is stale, run `make protos`: {stale}"
