"""Helpers of the console tests: Debian's chromium (`make system-deps` installs it) driven by
Playwright for Python, screenshots as artefacts, and axe-core's accessibility check.

Screenshots of each view go to build/console-screenshots/ (CONVSERVE_SCREENSHOTS overrides it).
axe-core is vendored from its npm package (tests/console/axe.min.js, its version in the first
line) and injected as an init script, before the page's own, so no network is needed and the
page's content security policy (script-src 'self') stays on while it runs.
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from playwright.sync_api import Browser, BrowserContext, Page

HERE = Path(__file__).parent
REPO = HERE.parents[1]
AXE = HERE / "axe.min.js"
#: Debian's chromium: /usr/bin/chromium is a shell wrapper; Playwright starts the binary itself.
CHROMIUM = Path("/usr/lib/chromium/chromium")
SCREENSHOTS = Path(os.environ.get("CONVSERVE_SCREENSHOTS", REPO / "build" / "console-screenshots"))
#: The toy generator's latent size and classes (its images show the latents and the label).
LATENT = 64
GENERATOR_LABELS = ["0", "1", "2"]
#: axe-core impacts that fail a test.
BLOCKING_IMPACTS = ("serious", "critical")


def chromium_path() -> str:
    if CHROMIUM.is_file():
        return str(CHROMIUM)
    found = shutil.which("chromium")
    if found is None:
        pytest.fail("Debian's chromium is missing: `make system-deps` installs it")
    return found


def new_context(browser: Browser, **options: object) -> BrowserContext:
    """A fresh profile (no storage) with axe-core injected into every page."""
    context = browser.new_context(viewport={"width": 1200, "height": 860}, **options)
    context.add_init_script(path=str(AXE))
    return context


class PageErrors:
    """Uncaught exceptions of the page's scripts."""

    def __init__(self, page: Page) -> None:
        self.exceptions: list[str] = []
        page.on("pageerror", lambda error: self.exceptions.append(str(error)))


def screenshot(page: Page, name: str) -> Path:
    """A screenshot of the whole page, as an artefact of the run."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def assert_accessible(page: Page) -> None:
    """axe-core finds no serious or critical violation in what the page shows now."""
    results = page.evaluate("async () => await axe.run(document, {resultTypes: ['violations']})")
    blocking = [
        {
            "id": violation["id"],
            "impact": violation["impact"],
            "help": violation["help"],
            "nodes": [node["target"] for node in violation["nodes"]][:5],
        }
        for violation in results["violations"]
        if violation["impact"] in BLOCKING_IMPACTS
    ]
    assert not blocking, json.dumps(blocking, indent=2)


def http(
    url: str, body: bytes | None = None, headers: dict[str, str] | None = None, method: str | None = None
) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of one HTTP call (an error status is an answer, not an exception)."""
    request = urllib.request.Request(url, data=body, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, dict(answer.headers), answer.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def post_json(url: str, body: object) -> tuple[int, object]:
    status, _, raw = http(url, json.dumps(body).encode(), {"Content-Type": "application/json"}, "POST")
    return status, json.loads(raw)
