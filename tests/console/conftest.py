"""Fixtures of the console tests: one server with every kind of model for the package, one browser
per test module, a fresh browser profile per test."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import RunningServer, start_server
from playwright.sync_api import Browser, Page, sync_playwright
from toy_models import toy_generator, write_config

from console.pages import GENERATOR_LABELS, LATENT, PageErrors, chromium_path, new_context


@pytest.fixture(scope="package")
def console_server(
    trained_lenet: Path,
    trained_captioner: Path,
    trained_scenes_resnet: Path,
    trained_butd: tuple[Path, dict],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RunningServer]:
    """lenet5, scenes-resnet, captioner and captioner-butd (quick-trained), a toy generator named
    dcgan, and a model that fails to load (`broken`); repository control on, for the unload tests."""
    repository = tmp_path_factory.mktemp("console") / "models"
    shutil.copytree(trained_lenet, repository)
    shutil.copytree(trained_captioner / "models" / "captioner", repository / "captioner")
    shutil.copytree(trained_scenes_resnet / "scenes-resnet", repository / "scenes-resnet")
    shutil.copytree(trained_butd[0] / "models" / "captioner-butd", repository / "captioner-butd")
    toy_generator(repository / "dcgan" / "1" / "model.onnx", latent=LATENT)
    write_config(
        repository / "dcgan",
        {
            "name": "dcgan",
            "kind": "generator",
            "labels": GENERATOR_LABELS,
            "generator": {"latent_size": LATENT, "height": 8, "width": 8},
        },
    )
    broken = yaml.safe_load((repository / "lenet5" / "config.yaml").read_text()) | {"name": "broken"}
    (repository / "broken" / "1").mkdir(parents=True)
    write_config(repository / "broken", broken)
    (repository / "broken" / "1" / "model.onnx").write_bytes(b"not an ONNX graph")
    server = start_server(
        repository, repository.parent / "server.log", {"CONVSERVE_REPOSITORY_CONTROL": "enabled"}
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        args = ["--no-sandbox"] if os.geteuid() == 0 else []  # chromium's sandbox refuses root
        launched = playwright.chromium.launch(executable_path=chromium_path(), args=args)
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A page in a fresh profile; the test fails if the page's scripts threw."""
    context = new_context(browser)
    opened = context.new_page()
    errors = PageErrors(opened)
    yield opened
    context.close()
    assert not errors.exceptions, f"the page's scripts threw: {errors.exceptions}"
