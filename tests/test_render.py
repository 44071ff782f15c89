"""Rendering: perceptual colour maps, heatmaps, overlays at the original size, grids, .npy."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from lantern.core.preprocess import PreprocessSpec
from workers import render

SPEC = PreprocessSpec(crop_size=64, resize_size=64)


def luma(rgb: np.ndarray) -> np.ndarray:
    return rgb.astype(np.float64) @ np.array([0.2126, 0.7152, 0.0722])


def test_colour_maps_are_perceptual_dark_to_bright() -> None:
    for name in (render.HEAT_COLORMAP, render.GRID_COLORMAP):
        lut = render.colour_lut(name)
        assert lut.shape == (256, 3) and lut.dtype == np.uint8
        lightness = luma(lut)
        assert lightness[-1] - lightness[0] > 150
        assert np.all(np.diff(lightness) > -1.0), name  # never darker as the value rises
    assert render.colour_lut(render.HEAT_COLORMAP) is render.colour_lut(render.HEAT_COLORMAP)


def test_heatmap_png_has_the_map_size_and_colours() -> None:
    unit = np.zeros((64, 64), np.float32)
    unit[:8, :8] = 1.0
    image = Image.open(io.BytesIO(render.heatmap_png(unit)))
    assert image.format == "PNG" and image.size == (64, 64) and image.mode == "RGB"
    pixels = np.asarray(image)
    assert luma(pixels[0, 0]) > luma(pixels[-1, -1]) + 150  # hot corner bright, rest dark


def test_overlay_has_the_original_resolution_and_covers_only_the_crop() -> None:
    original = Image.new("RGB", (120, 80), (10, 200, 30))
    # resize 120x80 -> 96x64, centre crop 64 at x=16 -> x in [20, 100) of the original
    assert SPEC.crop_box(120, 80) == (20.0, 0.0, 100.0, 80.0)
    overlay = render.overlay_image(original, np.ones((64, 64), np.float32), SPEC)
    assert overlay.size == original.size
    before, after = np.asarray(original).astype(int), np.asarray(overlay).astype(int)
    changed = np.abs(after - before).sum(axis=2) > 0
    assert not changed[:, :20].any() and not changed[:, 100:].any()
    assert changed[:, 20:100].all()


def test_overlay_puts_heat_where_the_map_is_hot() -> None:
    original = Image.new("RGB", (200, 100), (0, 0, 0))
    unit = np.zeros((64, 64), np.float32)
    unit[:, 48:] = 1.0  # right quarter of the crop
    overlay = np.asarray(render.overlay_image(original, unit, SPEC))
    left, _, right, _ = SPEC.crop_box(200, 100)  # (50, 0, 150, 100)
    hot = luma(overlay[:, int(left + 0.8 * (right - left)) : int(right) - 1]).mean()
    cold = luma(overlay[:, int(left) + 1 : int(left + 0.6 * (right - left))]).mean()
    assert hot > cold + 50


def test_activation_grid_tiles_channels_in_a_square() -> None:
    channels = np.random.default_rng(0).random((16, 8, 8)).astype(np.float32)
    grid = Image.open(io.BytesIO(render.activation_grid_png(channels)))
    tile = 8 * 6  # 8 px maps enlarged to >= 48 px
    side = 4 * tile + 5 * render.GRID_GAP
    assert grid.size == (side, side)
    odd = render.activation_grid_image(channels[:5])  # 5 channels -> 3 x 2
    assert odd.size == (3 * tile + 4 * render.GRID_GAP, 2 * tile + 3 * render.GRID_GAP)


def test_raw_maps_are_float32_npy_exactly_as_computed() -> None:
    # float16 used to round 1.5e-3 and clip 70000; a raw map is now stored as it is.
    raw = np.array([[0.0, 1.5e-3], [70000.0, -2.0]], dtype=np.float32)
    loaded = np.load(io.BytesIO(render.npy_bytes(raw)), allow_pickle=False)
    assert loaded.dtype == np.float32 and loaded.shape == (2, 2)
    np.testing.assert_array_equal(loaded, raw)
