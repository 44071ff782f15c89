"""The web page at / in a real headless Chromium (Debian's, driven by Playwright), against
real redis-server, `lantern worker` and `lantern serve` processes: upload a generated
image, see the prediction bars, ask for explanations, wait for every image to load; a file
that is not an image, and Redis going away, end as readable messages.

The browser is Debian's `chromium` package (`.ci/run` installs it; see the README's
"Browser tests"): Playwright's own browser downloads do not work offline.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from models.data import draw_shape
from tests.conftest import TINY_CLASSES
from tests.service_fixtures import start_server, stop_server
from tests.stack_fixtures import Stack, stack  # noqa: F401  (fixture)

pytestmark = [pytest.mark.integration, pytest.mark.browser]

CHROMIUM = os.environ.get("LANTERN_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).is_file():
        pytest.fail(
            f"no Chromium at {CHROMIUM}: install Debian's package "
            "(apt-get install chromium; .ci/run does) or set LANTERN_CHROMIUM"
        )
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Any, stack: Stack) -> Iterator[Any]:  # noqa: F811
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.errors = []  # uncaught script errors: none may happen
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    page.goto(stack.url + "/")
    yield page
    context.close()


def shape_file(index: int, size: int = 96) -> dict[str, Any]:
    buf = io.BytesIO()
    draw_shape(index, size=size).image.save(buf, "PNG")
    return {"name": f"shape-{index}.png", "mimeType": "image/png", "buffer": buf.getvalue()}


def test_the_page_predicts_and_explains_an_uploaded_image(
    page: Any,
    stack: Stack,  # noqa: F811
    tmp_path: Path,
) -> None:
    image = shape_file(2)
    expected = httpx.post(
        stack.url + "/predict", files={"image": (image["name"], image["buffer"])}, timeout=30
    ).json()

    page.set_input_files("#file-input", files=[image])
    page.wait_for_selector("#bars li")
    bars = page.locator("#bars li")
    assert bars.count() == len(TINY_CLASSES)
    assert [bars.nth(i).locator(".bar-label").inner_text() for i in range(bars.count())] == [
        e["label"] for e in expected["top_k"]
    ]
    assert page.inner_text("#top-label").startswith(expected["label"])
    widths = page.eval_on_selector_all(
        "#bars .bar-fill", "fills => fills.map(f => f.getBoundingClientRect().width)"
    )
    assert widths == sorted(widths, reverse=True) and widths[0] > widths[-1] > 0

    # the layer select offers the model's stages (GET /model) with their feature-map sizes
    page.wait_for_function(
        "() => document.querySelector('#layer option[value=\"layer4\"]')"
        ".textContent.includes('512×2×2')"
    )
    options = page.eval_on_selector_all("#layer option", "os => os.map(o => o.value)")
    assert options == ["layer1", "layer2", "layer3", "layer4"]
    assert page.eval_on_selector("#layer", "s => s.value") == "layer4"
    page.check('input[name="methods"][value="activations"]')
    page.select_option("#layer", "layer3")
    page.evaluate(
        """() => {
            window.statusSeen = [];
            new MutationObserver(() => window.statusSeen.push(
                document.getElementById("job-status").textContent
            )).observe(document.getElementById("job-status"), {childList: true});
        }"""
    )
    page.click("#explain-button")
    page.wait_for_selector("#results-section:not([hidden])")
    seen = page.evaluate("window.statusSeen")
    assert any(text.startswith("Queued") for text in seen), seen  # the job's progress
    assert page.locator("#job").is_hidden()  # and gone once the results are in
    page.wait_for_function(
        "() => Array.from(document.querySelectorAll('#results img'))"
        ".every(img => img.complete && img.naturalWidth > 0)"
    )
    assert page.locator("#error").is_hidden()
    captions = {
        method: page.locator(f'.result[data-method="{method}"] figcaption').all_inner_texts()
        for method in ("gradcam", "activations")
    }
    assert captions == {
        "gradcam": ["Original", "Heatmap", "Overlay"],
        "activations": ["Original", "Heatmap", "Overlay", "Activation grid"],
    }
    assert "layer3" in page.inner_text("#results-summary")
    links = page.eval_on_selector_all("#download-list a", "links => links.map(a => a.href)")
    names = sorted(link.rsplit(".", 2)[-2] + "." + link.rsplit(".", 1)[-1] for link in links)
    # gradcam: heatmap, overlay, raw, upsampled; activations: + grid, channels
    assert len(links) == 4 + 6
    assert names.count("heatmap.png") == 2 and "grid.png" in names
    for link in links:
        assert httpx.get(link, timeout=10).status_code == 200, link
    page.screenshot(path=str(tmp_path / "page-with-results.png"), full_page=True)
    assert page.errors == []


def test_a_real_model_gets_no_demo_banner(page: Any, stack: Stack) -> None:  # noqa: F811
    assert httpx.get(f"{stack.url}/model", timeout=10).json()["demo"] is None  # tiny_bundle
    # The first load's own GET /model is over before the reload, so the answer awaited
    # below is the reloaded page's (reading an answer of the page the reload left fails).
    page.wait_for_load_state("networkidle")
    with page.expect_response(lambda r: r.url.endswith("/model")) as answer:
        page.reload()
    assert answer.value.ok
    page.wait_for_load_state("networkidle")
    assert page.locator("#demo-banner").is_hidden()


def test_the_trust_score_is_shown_beside_each_heatmap_with_how_to_read_it(page: Any) -> None:
    page.set_input_files("#file-input", files=[shape_file(1)])
    page.wait_for_selector("#bars li")
    page.check('input[name="methods"][value="saliency"]')
    page.check("#faithfulness")
    page.click("#explain-button")
    page.wait_for_selector("#results-section:not([hidden])")
    for method in ("gradcam", "saliency"):
        text = page.inner_text(f'.result[data-method="{method}"] .faithfulness')
        assert "deletion AUC" in text and "insertion AUC" in text and "(random " in text
        assert "16 steps" in text and "mean colour" in text
        assert (
            "lower deletion AUC than random means removing what the map points at destroys "
            "the prediction faster than removing random pixels" in text
        )
    assert page.locator("#error").is_hidden()
    assert page.errors == []


def test_a_file_that_is_not_an_image_shows_the_servers_message(page: Any) -> None:
    page.set_input_files(
        "#file-input",
        files=[{"name": "notes.png", "mimeType": "image/png", "buffer": b"just some text"}],
    )
    banner = page.wait_for_selector("#error:not([hidden])")
    text = banner.inner_text()
    assert "notes.png" in text and "not an image" in text, text
    assert page.locator("#explain-section").is_hidden()
    assert page.errors == []


PAGE_KEY = "page-test-key-0123456789"


@pytest.fixture(scope="module")
def keyed_url(stack: Stack, tiny_bundle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:  # noqa: F811  # type: ignore[no-untyped-def]
    """A second `lantern serve` with LANTERN_API_KEYS, on the stack's Redis and worker."""
    shared = {k: stack.env[k] for k in ("REDIS_URL", "LANTERN_ARTIFACT_DIR", "LANTERN_QUEUE")}
    server = start_server(
        tiny_bundle.tag,
        tmp_path_factory.mktemp("keyed") / "server.log",
        extra_env={**shared, "LANTERN_API_KEYS": f"other-key,{PAGE_KEY}"},
    )
    yield server.url
    stop_server(server)


def test_the_page_asks_for_the_api_key_once_and_sends_it_everywhere(
    browser: Any, keyed_url: str
) -> None:
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    sent: list[tuple[str, str | None]] = []
    page.on(
        "request",
        lambda r: (
            sent.append((r.url, r.headers.get("authorization")))
            if "/jobs/" in r.url or "predict" in r.url or "explain" in r.url
            else None
        ),
    )
    page.goto(keyed_url + "/")
    assert page.locator("#key-form").is_hidden()  # no prompt until the API answers 401

    page.set_input_files("#file-input", files=[shape_file(3)])
    page.wait_for_selector("#key-form:not([hidden])")
    assert "needs an API key" in page.inner_text("#key-message")
    page.fill("#key-input", "a-wrong-key")
    page.click("#key-submit")
    page.wait_for_selector("#key-form:not([hidden])")
    page.wait_for_function(
        "() => document.getElementById('key-message').textContent.includes('not accepted')"
    )
    page.fill("#key-input", PAGE_KEY)
    page.click("#key-submit")
    page.wait_for_selector("#bars li")
    assert page.locator("#key-form").is_hidden()
    assert page.evaluate("sessionStorage.getItem('lantern.apiKey')") == PAGE_KEY

    page.check('input[name="methods"][value="saliency"]')
    page.click("#explain-button")
    page.wait_for_selector("#results-section:not([hidden])")
    page.wait_for_function(
        "() => Array.from(document.querySelectorAll('#results img'))"
        ".every(img => img.complete && img.naturalWidth > 0)"
    )
    assert page.locator("#error").is_hidden()
    srcs = page.eval_on_selector_all("#results img", "imgs => imgs.map(i => i.src)")
    assert len(srcs) == 2 * 3 and all(src.startswith("blob:") for src in srcs)
    accepted = [auth for _, auth in sent].index(f"Bearer {PAGE_KEY}")
    assert [auth for _, auth in sent[:accepted]] == [None, "Bearer a-wrong-key"]
    assert all(auth == f"Bearer {PAGE_KEY}" for _, auth in sent[accepted:]), sent
    artifacts = [url for url, _ in sent[accepted:] if url.endswith(".png")]
    assert len(artifacts) == 4, artifacts  # heatmap and overlay of both methods

    # A download link fetches with the key too.
    with page.expect_download() as download:
        page.click("#downloads summary")
        page.locator("#download-list a").first.click()
    assert Path(download.value.path()).stat().st_size > 0

    # The key lasts for the tab: a reload asks no more.
    page.reload()
    page.set_input_files("#file-input", files=[shape_file(0)])
    page.wait_for_selector("#bars li")
    assert page.locator("#key-form").is_hidden()
    assert errors == []
    context.close()


def test_explanations_while_redis_is_down_show_a_readable_message(
    page: Any,
    stack: Stack,  # noqa: F811
) -> None:
    # Last in this module: it stops the stack's Redis.
    stack.redis.stop()
    page.set_input_files("#file-input", files=[shape_file(1)])
    page.wait_for_selector("#bars li")  # predictions work without Redis
    page.click("#explain-button")
    text = page.wait_for_selector("#error:not([hidden])").inner_text()
    assert "unavailable" in text.lower() and "redis" in text.lower(), text
    assert page.locator("#results-section").is_hidden()
    assert not page.locator("#explain-button").is_disabled()  # ready to try again
    assert page.errors == []
