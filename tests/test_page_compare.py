"""The page's "why this class and not another?" view (compare_top), in the real headless
Chromium of tests/test_page.py against real redis-server, `lantern worker` and `lantern
serve` processes: the top classes' maps appear side by side, each headed by the class and
its probability as the prediction bars show them."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.stack_fixtures import Stack, stack  # noqa: F401  (fixture)
from tests.test_page import browser, page, shape_file  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.integration, pytest.mark.browser]


def test_the_top_classes_are_shown_side_by_side_with_their_names_and_probabilities(
    page: Any,  # noqa: F811
    stack: Stack,  # noqa: F811
) -> None:
    image = shape_file(3)
    expected = httpx.post(
        stack.url + "/predict", files={"image": (image["name"], image["buffer"])}, timeout=30
    ).json()["top_k"][:3]
    page.set_input_files("#file-input", files=[image])
    page.wait_for_selector("#bars li")
    page.check('input[name="methods"][value="saliency"]')
    page.select_option("#compare-top", "3")
    page.click("#explain-button")
    page.wait_for_selector("#results-section:not([hidden])")
    page.wait_for_function(
        "() => Array.from(document.querySelectorAll('.compare img'))"
        ".every(img => img.complete && img.naturalWidth > 0)"
    )
    # the page's percent(): one decimal from 10 %, two below
    percent = [
        f"{e['probability'] * 100:.{1 if e['probability'] >= 0.1 else 2}f}%" for e in expected
    ]
    for method in ("gradcam", "saliency"):
        view = page.locator(f'.result[data-method="{method}"] .compare')
        labels = view.locator(".compare-label").all_inner_texts()
        assert labels == [f"{e['label']} · {p}" for e, p in zip(expected, percent, strict=True)]
        assert view.locator(".compare-class").count() == 3
        assert view.locator("img").count() == 3
        # side by side: one row, left to right in rank order
        boxes = view.locator(".compare-class").evaluate_all(
            "items => items.map(i => i.getBoundingClientRect()).map(r => [r.top, r.left])"
        )
        assert len({round(top) for top, _ in boxes}) == 1
        assert [left for _, left in boxes] == sorted(left for _, left in boxes)
    assert "beside its top 3 classes" in page.inner_text("#results-summary")
    assert page.locator("#error").is_hidden()
    assert page.errors == []


def test_comparing_with_a_chosen_class_is_refused_with_a_sentence(page: Any) -> None:  # noqa: F811
    page.set_input_files("#file-input", files=[shape_file(1)])
    page.wait_for_selector("#bars li")
    page.select_option("#target", index=2)
    page.select_option("#compare-top", "2")
    page.click("#explain-button")
    page.wait_for_selector("#error:not([hidden])")
    assert "set “Class to explain” back to the top prediction" in page.inner_text("#error-text")
    assert page.locator("#results-section").is_hidden()
    assert page.errors == []
