"""The console as a person uses it, in a real browser: each view, its states, its accessibility.

Every view is checked with axe-core and photographed (build/console-screenshots/). The page runs
under the server's own content security policy throughout, so nothing here works by an inline
script the policy would stop.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from conftest import RunningServer
from drawing import STROKES
from playwright.sync_api import Page, expect

from console.pages import assert_accessible, http, post_json, screenshot

REPO = Path(__file__).resolve().parents[2]
CONSOLE_FILES = REPO / "service" / "transports" / "http" / "console"
DIGIT = REPO / "examples" / "digit-7.jpg"


def _open(page: Page, server: RunningServer, view: str = "models") -> None:
    page.goto(f"{server.http_url}/#{view}")
    expect(page.locator(f"#view-{view}")).to_be_visible()
    expect(page.locator('tr[data-model="lenet5"] .badge')).to_have_count(1)  # the first poll arrived


def _canvas(page: Page, selector: str) -> dict:
    """A canvas's size, a digest of its pixels and how many distinct pixel values it has."""
    return page.evaluate(
        """async (selector) => {
            const canvas = document.querySelector(selector);
            const pixels = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
            const digest = await crypto.subtle.digest("SHA-256", pixels);
            const hex = Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, "0")).join("");
            return {width: canvas.width, height: canvas.height, digest: hex, distinct: new Set(pixels).size};
        }""",
        selector,
    )


def _drop(page: Page, selector: str, name: str, data: bytes, mime: str) -> None:
    """Drop a file on an element, as dragging it from the desktop does."""
    page.evaluate(
        """([selector, name, bytes, mime]) => {
            const transfer = new DataTransfer();
            transfer.items.add(new File([new Uint8Array(bytes)], name, {type: mime}));
            const target = document.querySelector(selector);
            for (const type of ["dragenter", "dragover", "drop"]) {
                const options = {bubbles: true, cancelable: true, dataTransfer: transfer};
                target.dispatchEvent(new DragEvent(type, options));
            }
        }""",
        [selector, name, list(data), mime],
    )


def _draw(page: Page, digit: str, strokes: int | None = None) -> None:
    """Draw a digit on the digits canvas with the mouse, stroke by stroke, as drawing.py's pen does."""
    box = page.locator("#digits-canvas").bounding_box()
    assert box is not None
    size, margin = box["width"], 0.15
    inner = size * (1 - 2 * margin)
    for stroke in STROKES[digit][:strokes]:
        points = [
            (box["x"] + size * margin + x * inner * 0.8 + inner * 0.1, box["y"] + size * margin + y * inner)
            for x, y in stroke
        ]
        page.mouse.move(*points[0])
        page.mouse.down()
        for point in points[1:]:
            page.mouse.move(*point, steps=4)
        page.mouse.up()


def test_the_models_view_shows_every_model_its_state_and_its_last_minute(
    page: Page, console_server: RunningServer
) -> None:
    base = console_server.http_url
    for _ in range(5):  # traffic for the live figures
        assert http(f"{base}/v1/classify?model=lenet5", DIGIT.read_bytes(), method="POST")[0] == 200
    _open(page, console_server)
    listed = json.loads(http(f"{base}/v1/models")[2])["models"]
    for model in listed:
        expect(page.locator(f'tr[data-model="{model["name"]}"]')).to_have_count(len(model["versions"]))
    lenet = page.locator('tr[data-model="lenet5"]')
    expect(lenet.locator(".badge")).to_have_text("ready")
    expect(lenet).to_contain_text("CPUExecutionProvider")
    expect(lenet).to_contain_text("1x32x32 L")
    broken = page.locator('tr[data-model="broken"]')
    expect(broken.locator(".badge")).to_have_text("failed")
    reason = next(m for m in listed if m["name"] == "broken")["versions"][0]["reason"]
    assert reason
    expect(broken.locator(".reason")).to_have_text(reason)
    # The figures arrive with a poll once their second is complete.
    expect(lenet.locator(".rate")).to_have_text("0.08")  # 5 requests in the last 60 s
    expect(lenet.locator(".p50")).to_have_text(re.compile(r"^\d+(\.\d+)? ms$"))
    expect(lenet.locator(".p99")).to_have_text(re.compile(r"^\d+(\.\d+)? ms$"))
    assert_accessible(page)
    screenshot(page, "models")


def test_drawing_a_seven_shows_seven_at_the_top_updating_while_drawing(
    page: Page, console_server: RunningServer
) -> None:
    _open(page, console_server, "digits")
    _draw(page, "7", strokes=1)  # the first stroke: the bars already answer
    expect(page.locator("#digits-bars li")).to_have_count(10)
    _draw(page, "7")
    expect(page.locator("#digits-top")).to_have_text("7")
    expect(page.locator("#digits-bars li").first.locator(".label")).to_have_text("7")
    assert_accessible(page)
    screenshot(page, "digits")


def test_a_rejected_request_shows_the_servers_message(page: Page, console_server: RunningServer) -> None:
    not_an_image = b"these bytes are no image at all"
    status, _, body = http(
        f"{console_server.http_url}/v1/classify?model=lenet5&top_k=10", not_an_image, method="POST"
    )
    assert status == 400
    message = json.loads(body)["error"]
    _open(page, console_server, "digits")
    _drop(page, "#digits-drop", "notes.txt", not_an_image, "text/plain")
    expect(page.locator("#digits-error")).to_have_text(f"400: {message}")
    expect(page.locator("#digits-error")).to_be_visible()


def test_the_same_seed_gives_the_same_pixels_and_the_walk_joins_two_seeds(
    page: Page, console_server: RunningServer
) -> None:
    _open(page, console_server, "generator")
    page.select_option("#generator-count", "1")

    def generate(seed: int) -> dict:
        page.fill("#generator-seed", str(seed))
        page.click("#generator-form button[type=submit]")
        expect(page.locator("#generator-used-seed")).to_have_text(str(seed))
        return _canvas(page, "#generator-canvas")

    five, six, five_again = generate(5), generate(6), generate(5)
    assert five == five_again
    assert five["digest"] != six["digest"]
    assert five["distinct"] > 2 and (five["width"], five["height"]) == (256, 256)

    page.fill("#walk-from", "5")
    page.fill("#walk-to", "6")
    for position, expected in (("0", five), ("100", six)):  # the walk's ends are the seeds' images
        page.fill("#walk-position", position)
        expect(page.locator(f'#walk-canvas[data-position="{position}"]')).to_have_count(1)
        assert _canvas(page, "#walk-canvas") == expected
    page.fill("#walk-position", "50")
    expect(page.locator('#walk-canvas[data-position="50"]')).to_have_count(1)
    assert _canvas(page, "#walk-canvas")["digest"] not in (five["digest"], six["digest"])
    assert_accessible(page)
    screenshot(page, "generator")


def test_a_dropped_scene_gets_a_class_and_a_caption_whose_words_show_their_attention(
    page: Page, console_server: RunningServer
) -> None:
    _open(page, console_server, "scenes")
    scene = (CONSOLE_FILES / "scene-green-circle.png").read_bytes()
    _drop(page, "#scenes-drop", "scene.png", scene, "image/png")
    words = page.locator("#scenes-caption .word")
    expect(words.first).to_be_visible()
    expect(page.locator("#scenes-class")).to_have_text(re.compile(r"^\w+ \w+ \(\d+\.\d %\)$"))
    overlay = page.locator("#scenes-overlay")
    expect(overlay).to_be_hidden()
    words.first.hover()
    expect(overlay).to_be_visible()
    expect(overlay).to_have_attribute("data-word", "0")
    alpha = page.evaluate(
        """() => {
            const canvas = document.getElementById("scenes-overlay");
            const pixels = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
            let low = 255, high = 0;
            for (let i = 3; i < pixels.length; i += 4) {
                low = Math.min(low, pixels[i]);
                high = Math.max(high, pixels[i]);
            }
            return [low, high];
        }"""
    )
    assert alpha[1] > alpha[0], f"the overlay is flat (alpha {alpha}): it shows no attention map"
    assert_accessible(page)
    screenshot(page, "scenes")
    page.mouse.move(5, 5)
    expect(overlay).to_be_hidden()
    example = (CONSOLE_FILES / "scene-red-circle.png").read_bytes()
    with page.expect_response(lambda r: "/v1/classify" in r.url) as classified:
        page.click('[data-example="scene-red-circle.png"]')  # an example scene, picked
    answer = classified.value
    assert answer.status == 200
    url = f"{console_server.http_url}/v1/classify?model=scenes-resnet&top_k=3"
    status, _, body = http(url, example, method="POST")  # the same scene, sent by the test itself
    assert status == 200 and answer.json() == json.loads(body), "the page sent that example scene"
    best = answer.json()["predictions"][0]  # the page shows the answer (the quick test model's, right or not)
    expect(page.locator("#scenes-class")).to_have_text(f"{best['label']} ({best['score'] * 100:.1f} %)")


def test_a_captioner_over_regions_shows_each_words_attention_as_weighted_boxes(
    page: Page, console_server: RunningServer
) -> None:
    _open(page, console_server, "scenes")
    expect(page.locator('#scenes-captioner option[value="captioner-butd"]')).to_have_count(1)
    page.select_option("#scenes-captioner", "captioner-butd")
    with page.expect_response(lambda r: "/v1/caption" in r.url and "captioner-butd" in r.url) as captioned:
        scene = (CONSOLE_FILES / "scene-red-circle.png").read_bytes()
        _drop(page, "#scenes-drop", "scene.png", scene, "image/png")
    regions = captioned.value.json()["regions"]
    assert len(regions) == 4
    words = page.locator("#scenes-caption .word")
    expect(words.first).to_be_visible()
    words.first.hover()
    overlay = page.locator("#scenes-overlay")
    expect(overlay).to_have_attribute("data-regions", "4")
    outline = page.evaluate(
        """() => {
            const canvas = document.getElementById("scenes-overlay");
            const pixels = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
            let outlined = 0;  // the boxes' amber outline: red and green high, blue low
            for (let i = 0; i < pixels.length; i += 4) {
                const [red, green, blue, alpha] = pixels.slice(i, i + 4);
                if (alpha > 0 && red > 200 && green > 120 && blue < 60) outlined++;
            }
            return outlined;
        }"""
    )
    assert outline > 20, "no box outlines drawn over the scene"
    page.select_option("#scenes-captioner", "captioner")  # a grid captioner: a map again, no boxes
    expect(page.locator("#scenes-caption .word").first).to_be_visible()
    page.mouse.move(5, 5)
    page.locator("#scenes-caption .word").first.hover()
    expect(overlay).to_have_attribute("data-regions", "0")


def test_a_model_unloaded_through_the_api_shows_unloaded_within_five_seconds(
    page: Page, console_server: RunningServer
) -> None:
    base = console_server.http_url
    _open(page, console_server, "models")
    badge = page.locator('tr[data-model="dcgan"] .badge')
    expect(badge).to_have_text("ready")
    try:
        assert post_json(f"{base}/v2/repository/models/dcgan/unload", {}) == (200, {})
        expect(badge).to_have_text("unloaded", timeout=5000)
        page.click('nav a[data-view="generator"]')
        expect(page.locator("#generator-model-state")).to_have_text("dcgan is unloaded.")
    finally:
        assert post_json(f"{base}/v2/repository/models/dcgan/load", {}) == (200, {})


def test_a_page_of_another_site_cannot_unload_a_model(page: Page, console_server: RunningServer) -> None:
    """A plain cross-site form post (what any web page can make a visitor's browser send) is refused."""
    target = f"{console_server.http_url}/v2/repository/models/lenet5/unload"
    form = (
        f'<!doctype html><title>elsewhere</title><form method="post" action="{target}" enctype="text/plain">'
        '<input name="a" value="b"><button>send</button></form>'
    )
    page.route("http://elsewhere.test/**", lambda route: route.fulfill(body=form, content_type="text/html"))
    page.goto("http://elsewhere.test/")
    with page.expect_navigation() as navigation:
        page.click("button")
    answer = navigation.value
    assert answer is not None and answer.status == 403
    assert json.loads(answer.text()) == {
        "error": "refused: a request from another web site may not change the server"
    }
    assert http(f"{console_server.http_url}/v2/models/lenet5/ready")[0] == 200


def test_a_model_still_loading_is_shown_as_loading(page: Page, console_server: RunningServer) -> None:
    """A state that lasts only while a version loads, so the model list is stood in for here."""
    status, _, body = http(f"{console_server.http_url}/v1/models")
    assert status == 200
    listed = json.loads(body)
    for model in listed["models"]:
        if model["name"] == "dcgan":
            model["versions"] = [{"version": "2", "state": "LOADING", "reason": "", "provider": ""}]
    page.route(
        "**/v1/models", lambda route: route.fulfill(body=json.dumps(listed), content_type="application/json")
    )
    _open(page, console_server, "models")
    expect(page.locator('tr[data-model="dcgan"] .badge')).to_have_text("loading")
    page.click('nav a[data-view="generator"]')
    expect(page.locator("#generator-model-state")).to_have_text(
        "dcgan is still loading; it can be tried once it is ready."
    )
