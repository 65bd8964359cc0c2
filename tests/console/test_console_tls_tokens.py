"""The console over https with bearer tokens: the page loads without a token, every call it makes
needs one, a wrong one shows the server's rejection, and the token stays out of lasting storage."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import RunningServer, start_server
from playwright.sync_api import Browser, Page, expect

from console.pages import PageErrors, assert_accessible, new_context, screenshot

TOKEN = "console-s3cret"


@pytest.fixture(scope="module")
def secure_server(trained_lenet: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """TLS with a self-signed certificate for 127.0.0.1, tokens on; health over the plaintext port."""
    folder = tmp_path_factory.mktemp("console-tls")
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
            "-keyout", str(folder / "server.key"), "-out", str(folder / "server.crt"),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )  # fmt: skip
    env = {
        "CONVSERVE_TLS_CERT_FILE": str(folder / "server.crt"),
        "CONVSERVE_TLS_KEY_FILE": str(folder / "server.key"),
        "CONVSERVE_AUTH_TOKENS": TOKEN,
    }
    server = start_server(trained_lenet, folder / "server.log", env, plaintext_health=True)
    server.http_url = server.http_url.replace("http://", "https://")
    yield server
    server.stop()


@pytest.fixture
def secure_page(browser: Browser) -> Iterator[Page]:
    """A page that accepts the self-signed certificate (as a person would, once)."""
    context = new_context(browser, ignore_https_errors=True)
    page = context.new_page()
    errors = PageErrors(page)
    yield page
    context.close()
    assert not errors.exceptions, f"the page's scripts threw: {errors.exceptions}"


def _use_token(page: Page, token: str, keep: bool = False) -> None:
    page.fill("#token", token)
    page.set_checked("#token-keep", keep)
    page.click("#token-form button[type=submit]")


def test_over_https_the_page_loads_without_a_token_and_shows_the_servers_refusal(
    secure_page: Page, secure_server: RunningServer
) -> None:
    page = secure_page
    answer = page.goto(f"{secure_server.http_url}/")
    assert answer is not None and answer.status == 200 and page.url.startswith("https://")
    banner = page.locator("#connection")
    expect(banner).to_have_text("The server refused the call: missing bearer token. Enter a token above.")
    _use_token(page, "not-the-token")
    expect(banner).to_have_text("The server refused the call: invalid bearer token. Enter a token above.")
    assert_accessible(page)
    screenshot(page, "token-refused")
    page.click('nav a[data-view="digits"]')  # a view's own call shows the refusal too
    page.set_input_files(
        "#digits-file", str(Path(__file__).resolve().parents[2] / "examples" / "digit-7.jpg")
    )
    expect(page.locator("#digits-error")).to_have_text("401: invalid bearer token")
    refused = [json.loads(line) for line in secure_server.log().splitlines() if "UNAUTHENTICATED" in line]
    assert any(line["method"] == "GET /v1/models" for line in refused), "refused polls are logged"


def test_with_the_token_every_view_works_and_the_token_is_kept_only_when_asked(
    secure_page: Page, secure_server: RunningServer
) -> None:
    page = secure_page
    page.goto(f"{secure_server.http_url}/#digits")
    _use_token(page, TOKEN)
    page.set_input_files(
        "#digits-file", str(Path(__file__).resolve().parents[2] / "examples" / "digit-7.jpg")
    )
    expect(page.locator("#digits-top")).to_have_text("7")
    page.click('nav a[data-view="models"]')
    expect(page.locator('tr[data-model="lenet5"] .badge')).to_have_text("ready")
    expect(page.locator("#connection")).to_be_hidden()
    storage = page.evaluate("() => [localStorage.length, sessionStorage.length, document.cookie]")
    assert storage == [0, 0, ""], "without 'keep', the token lives in memory only"
    _use_token(page, TOKEN, keep=True)
    assert page.evaluate("() => sessionStorage.getItem('convserve-token')") == TOKEN
    assert page.evaluate("() => localStorage.length") == 0
    page.reload()  # kept for this tab: still accepted
    expect(page.locator('tr[data-model="lenet5"] .badge')).to_have_text("ready")
    expect(page.locator("#connection")).to_be_hidden()


def test_the_page_says_when_the_server_is_gone(secure_page: Page, secure_server: RunningServer) -> None:
    """Last in the module: it stops the server."""
    page = secure_page
    page.goto(f"{secure_server.http_url}/")
    _use_token(page, TOKEN)
    expect(page.locator('tr[data-model="lenet5"] .badge')).to_have_text("ready")
    assert secure_server.stop() == 0
    expect(page.locator("#connection")).to_have_text("The server cannot be reached; retrying.")
    expect(page.locator('tr[data-model="lenet5"] .badge')).to_have_text("ready")  # the last figures stay
