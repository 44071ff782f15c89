"""Choosing the model version on the page, in the real headless Chromium of
tests/test_page.py against real redis-server, `lantern worker` and `lantern serve`
processes: the "Model version" select lists the store's versions (GET /models), a second
version chosen there is the one the job ran (its manifest says so), and two versions
compared stand side by side, each under its name.

The second version is test_explain_choices's: the tiny model again with other weights,
registered in the session's model store.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.stack_fixtures import Stack, stack  # noqa: F401  (fixture)
from tests.test_explain_choices import second_bundle  # noqa: F401  (fixture)
from tests.test_page import browser, page, shape_file  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.integration, pytest.mark.browser]

ALL_IMAGES_LOADED = (
    "() => Array.from(document.querySelectorAll('#results img'))"
    ".every(img => img.complete && img.naturalWidth > 0)"
)


def _manifest(stack: Stack, job_id: str) -> dict[str, Any]:  # noqa: F811
    status = httpx.get(f"{stack.url}/jobs/{job_id}", timeout=10).json()
    assert status["status"] == "finished", status
    manifest: dict[str, Any] = status["manifest"]
    return manifest


def _choose_image(page: Any, listed: str) -> None:  # noqa: F811
    """Upload an image and wait until the version select lists `listed`."""
    page.set_input_files("#file-input", files=[shape_file(2)])
    page.wait_for_selector("#bars li")
    page.wait_for_selector(f'#model option[value="{listed}"]', state="attached")


def test_a_version_chosen_on_the_page_is_the_one_that_explains(
    page: Any,  # noqa: F811
    stack: Stack,  # noqa: F811
    tiny_bundle: Any,
    second_bundle: Any,  # noqa: F811
) -> None:
    _choose_image(page, second_bundle.version)
    options = dict(
        page.eval_on_selector_all("#model option", "os => os.map(o => [o.value, o.text])")
    )
    # newest first (other test modules of the session may have registered more), each with
    # its architecture; the served one chosen and marked
    order = list(options)
    assert order.index(second_bundle.version) < order.index(tiny_bundle.version)
    assert options[tiny_bundle.version].startswith(f"{tiny_bundle.version} (served) · resnet18")
    assert [text for text in options.values() if "(served)" in text] == [
        options[tiny_bundle.version]
    ]
    assert page.eval_on_selector("#model", "s => s.value") == tiny_bundle.version
    assert page.locator("#compare-model-field").is_visible()

    page.select_option("#model", second_bundle.version)
    page.click("#explain-button")
    page.wait_for_selector("#results-section:not([hidden])")
    page.wait_for_function(ALL_IMAGES_LOADED)
    runs = page.locator("#results .version-results")
    assert runs.count() == 1
    assert runs.locator(".version-name").inner_text() == f"Model version {second_bundle.version}"
    assert runs.get_attribute("data-model") == second_bundle.tag
    # what the worker ran, by the job's own manifest
    manifest = _manifest(stack, runs.get_attribute("data-job-id"))
    assert manifest["model"] == second_bundle.tag
    assert page.locator("#error").is_hidden()
    assert page.errors == []


def test_two_versions_compared_stand_side_by_side_each_under_its_name(
    page: Any,  # noqa: F811
    stack: Stack,  # noqa: F811
    tiny_bundle: Any,
    second_bundle: Any,  # noqa: F811
) -> None:
    _choose_image(page, second_bundle.version)
    page.select_option("#compare-model", second_bundle.version)  # beside the served one
    page.click("#explain-button")
    page.wait_for_selector("#results-section:not([hidden])")
    page.wait_for_function(ALL_IMAGES_LOADED)
    runs = page.locator("#results .version-results")
    assert runs.count() == 2
    assert runs.locator(".version-name").all_inner_texts() == [
        f"Model version {tiny_bundle.version} (served)",
        f"Model version {second_bundle.version}",
    ]
    # side by side: one row, the served version on the left
    boxes = runs.evaluate_all(
        "items => items.map(i => i.getBoundingClientRect()).map(r => [r.top, r.left, r.width])"
    )
    assert round(boxes[0][0]) == round(boxes[1][0])
    assert boxes[0][1] + boxes[0][2] <= boxes[1][1]
    # each column is its own job, run with its own version, with its own maps
    for i, bundle in enumerate((tiny_bundle, second_bundle)):
        run = runs.nth(i)
        assert run.get_attribute("data-model") == bundle.tag
        assert _manifest(stack, run.get_attribute("data-job-id"))["model"] == bundle.tag
        captions = run.locator('.result[data-method="gradcam"] figcaption').all_inner_texts()
        assert captions == ["Original", "Heatmap", "Overlay"]
        assert run.locator(".version-summary").inner_text().startswith("Explaining “")
    assert runs.nth(0).get_attribute("data-job-id") != runs.nth(1).get_attribute("data-job-id")
    summary = page.inner_text("#results-summary")
    assert "2 model versions, side by side" in summary
    assert tiny_bundle.version in summary and second_bundle.version in summary
    # every file of both, each named with its version
    page.click("#downloads summary")
    links = page.locator("#download-list a").all_inner_texts()
    for bundle in (tiny_bundle, second_bundle):
        assert sum(text.endswith(f"· version {bundle.version}") for text in links) == 4
    assert page.locator("#error").is_hidden()
    assert page.errors == []


def test_comparing_a_version_with_itself_is_refused_with_a_sentence(
    page: Any,  # noqa: F811
    tiny_bundle: Any,
    second_bundle: Any,  # noqa: F811
) -> None:
    _choose_image(page, second_bundle.version)
    page.select_option("#compare-model", tiny_bundle.version)
    page.click("#explain-button")
    page.wait_for_selector("#error:not([hidden])")
    assert "names the version already chosen" in page.inner_text("#error-text")
    assert page.locator("#results-section").is_hidden()
    assert page.errors == []
