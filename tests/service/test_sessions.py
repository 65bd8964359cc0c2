"""onnxruntime sessions: how a provider fallback is reported (service/engine/sessions.py)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from service.engine import sessions
from service.engine.sessions import CPU, CUDA, ModelSession, SessionOptions


@pytest.fixture(autouse=True)
def fresh_notes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sessions, "_noted_fallbacks", set())


def records(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == sessions.__name__ and r.levelno == level]


def test_a_default_fallback_is_one_note_per_process(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=sessions.__name__)
    for graph in ("encoder.onnx", "decoder.onnx", "model.onnx"):
        sessions._report_fallback(CUDA, CPU, Path(graph), explicit=False)
    assert records(caplog, logging.WARNING) == []
    assert records(caplog, logging.INFO) == [
        f"{CUDA} is not usable here: models run on {CPU} (--log-level DEBUG shows why)"
    ]
    assert len(records(caplog, logging.DEBUG)) == 2


def test_a_fallback_from_providers_asked_for_warns_for_every_graph(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=sessions.__name__)
    for graph in ("encoder.onnx", "decoder.onnx"):
        sessions._report_fallback(CUDA, CPU, Path(graph), explicit=True)
    warnings = records(caplog, logging.WARNING)
    assert len(warnings) == 2 and all(f"asked for {CUDA}, got {CPU}" in w for w in warnings)


def test_default_providers_never_warn_about_the_gpu(
    trained_lenet: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """On any machine: CUDA serves, CUDA is not offered (CPU onnxruntime), or it is offered and not usable."""
    caplog.set_level(logging.DEBUG, logger=sessions.__name__)
    model = trained_lenet / "lenet5" / "1" / "model.onnx"
    for _ in range(3):
        ModelSession(model, SessionOptions(providers=(CUDA, CPU)))
    assert records(caplog, logging.WARNING) == []
    # one note when CUDA was offered but fell back, none when it served or was not offered
    assert len(records(caplog, logging.INFO)) == len(sessions._noted_fallbacks) <= 1
