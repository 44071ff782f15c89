"""The page's across-depth view, in the real headless Chromium of tests/test_page.py
against real redis-server, `lantern worker` and `lantern serve` processes: the depth PNG is
shown at its own size with a sentence naming every stage."""

from __future__ import annotations

from typing import Any

import pytest

from tests.stack_fixtures import Stack, stack  # noqa: F401  (fixture)
from tests.test_page import browser, page, shape_file  # noqa: F401  (fixtures)
from workers import render

pytestmark = [pytest.mark.integration, pytest.mark.browser]


def test_the_strongest_feature_maps_of_every_stage_are_shown(page: Any) -> None:  # noqa: F811
    page.set_input_files("#file-input", files=[shape_file(0)])
    page.wait_for_selector("#bars li")
    page.uncheck('input[name="methods"][value="gradcam"]')
    page.check('input[name="methods"][value="depth"]')
    page.click("#explain-button")
    page.wait_for_selector("#results-section:not([hidden])")
    view = page.locator('.result[data-method="depth"]')
    assert view.locator("h3").inner_text() == "Across depth"
    page.wait_for_function(
        "() => { const img = document.querySelector('.depth img');"
        " return img && img.complete && img.naturalWidth > 0; }"
    )
    natural = view.locator(".depth img").evaluate("img => [img.naturalWidth, img.naturalHeight]")
    shown = view.locator(".depth img").evaluate(
        "img => [img.getBoundingClientRect().width, img.getBoundingClientRect().height]"
    )
    tile, gap = render.DEPTH_TILE_MIN, render.GRID_GAP
    assert natural == [render.DEPTH_LABEL_WIDTH + 4 * tile + 5 * gap, 5 * tile + 6 * gap]
    # drawn at its own size (plus the border), so each tile is at least 96 px on screen
    assert abs(shown[0] - natural[0]) <= 2 and abs(shown[1] - natural[1]) <= 2
    assert view.locator(".depth figcaption").inner_text() == "Strongest feature maps by stage"
    text = view.locator(".depth p").inner_text()
    assert "stem 32×32, layer1 16×16, layer2 8×8, layer3 4×4, layer4 2×2" in text
    links = page.eval_on_selector_all("#download-list a", "links => links.map(a => a.textContent)")
    assert "Across depth — Strongest feature maps by stage" in links
    assert "Across depth — Channels (.npy) (layer4)" in links
    assert page.locator("#error").is_hidden()
    assert page.errors == []
