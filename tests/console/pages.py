"""Helpers of the console tests: Debian's chromium (`make system-deps` installs it) driven by
Playwright for Python, screenshots as artefacts, and axe-core's accessibility check.

Screenshots of each view go to build/console-screenshots/ (CONVSERVE_SCREENSHOTS overrides it).
axe-core comes from its npm package, pinned and checked against the registry's sha512 integrity,
fetched once with `npm pack` into .axe-core/ (git-ignored), and injected as an init script, before
the page's own, so the page's content security policy (script-src 'self') stays on while it runs.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from playwright.sync_api import Browser, BrowserContext, Page

HERE = Path(__file__).parent
REPO = HERE.parents[1]
AXE_VERSION = "4.14.1"
#: The npm registry's dist.integrity of axe-core 4.14.1's package.
AXE_INTEGRITY = (
    "sha512-FHfa+lmNjQZfJz1q8wKqIDwC6DExcHt/pkjNQb09a3NPjCKg2rhu5qb2S4r76ASyFNNtuFooJpZe37OgudVGtQ=="
)
AXE_CACHE = REPO / ".axe-core"
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


def axe_script() -> Path:
    """axe.min.js of the pinned axe-core, fetched once from the npm registry; fails with why."""
    script = AXE_CACHE / AXE_VERSION / "axe.min.js"
    if script.is_file():
        return script
    folder = script.parent
    folder.mkdir(parents=True, exist_ok=True)
    if shutil.which("npm") is None:
        pytest.fail("npm is missing (`make system-deps` installs it): it fetches axe-core for the tests")
    packed = subprocess.run(
        ["npm", "pack", f"axe-core@{AXE_VERSION}", "--pack-destination", str(folder)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    if packed.returncode != 0:
        pytest.fail(f"npm could not fetch axe-core {AXE_VERSION}:\n{packed.stderr[-2000:]}")
    tarball = folder / f"axe-core-{AXE_VERSION}.tgz"
    digest = "sha512-" + base64.b64encode(hashlib.sha512(tarball.read_bytes()).digest()).decode()
    if digest != AXE_INTEGRITY:
        pytest.fail(f"axe-core {AXE_VERSION} from npm is not the package pinned: {digest}")
    with tarfile.open(tarball) as archive:
        member = archive.extractfile("package/axe.min.js")
        assert member is not None
        partial = script.with_suffix(".partial")
        partial.write_bytes(member.read())
    partial.replace(script)
    return script


def new_context(browser: Browser, **options: object) -> BrowserContext:
    """A fresh profile (no storage) with axe-core injected into every page."""
    context = browser.new_context(viewport={"width": 1200, "height": 860}, **options)
    context.add_init_script(path=str(axe_script()))
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
