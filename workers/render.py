"""Rendering: maps in [0, 1] -> PNG heatmaps, overlays on the original picture, activation
grids, and raw float32 `.npy` files. numpy + Pillow; matplotlib only builds the colour maps.

Colour maps are perceptual (inferno for heat, viridis for the activation grid): lightness
rises monotonically with the value, so a brighter pixel always means "more".
"""

from __future__ import annotations

import io
import math
from functools import lru_cache

import numpy as np
from PIL import Image

from lantern.core.preprocess import PreprocessSpec

HEAT_COLORMAP = "inferno"
GRID_COLORMAP = "viridis"
OVERLAY_ALPHA = 0.5  # weight of the heatmap where the map is 1
GRID_TILE_MIN = 48  # px: small feature maps are enlarged (nearest) to at least this
GRID_GAP = 2
DEPTH_TILE_MIN = 96  # px: every tile of the depth view is at least this, whatever the stage
DEPTH_LABEL_WIDTH = 112  # px: the column naming each row's stage


@lru_cache(maxsize=4)
def colour_lut(name: str = HEAT_COLORMAP) -> np.ndarray:
    """(256, 3) uint8 lookup table for a matplotlib colour map; built once per name."""
    from matplotlib import colormaps

    rgba = colormaps[name](np.linspace(0.0, 1.0, 256))
    return np.ascontiguousarray((rgba[:, :3] * 255.0 + 0.5).astype(np.uint8))


def colourise(unit_map: np.ndarray, cmap: str = HEAT_COLORMAP) -> np.ndarray:
    """A (h, w) map in [0, 1] -> (h, w, 3) uint8 RGB."""
    index = np.clip(np.nan_to_num(unit_map) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    out: np.ndarray = colour_lut(cmap)[index]
    return out


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)  # maps are small; favour speed
    return buf.getvalue()


def heatmap_png(unit_map: np.ndarray) -> bytes:
    """The map as it lies on the model's input crop, coloured."""
    return png_bytes(Image.fromarray(colourise(unit_map)))


def overlay_image(
    original: Image.Image, unit_map: np.ndarray, spec: PreprocessSpec, alpha: float = OVERLAY_ALPHA
) -> Image.Image:
    """The map blended over the original picture at its own resolution.

    The map covers the crop the model saw (`spec.crop_box`); outside it the picture is
    left as it is. Heat is weighted by the map's value, so cool regions stay readable.
    """
    rgb = original.convert("RGB")
    width, height = rgb.size
    left, top, right, bottom = spec.crop_box(width, height)
    x0, y0 = max(0, round(left)), max(0, round(top))
    x1, y1 = min(width, round(right)), min(height, round(bottom))
    base = np.asarray(rgb, dtype=np.float32).copy()
    if x1 > x0 and y1 > y0:
        scaled = Image.fromarray(unit_map.astype(np.float32), mode="F").resize(
            (x1 - x0, y1 - y0), Image.Resampling.BILINEAR
        )
        value = np.clip(np.asarray(scaled), 0.0, 1.0)
        heat = colourise(value).astype(np.float32)
        weight = (alpha * (0.25 + 0.75 * value))[..., None]
        region = base[y0:y1, x0:x1]
        base[y0:y1, x0:x1] = region * (1.0 - weight) + heat * weight
    return Image.fromarray(np.clip(base + 0.5, 0, 255).astype(np.uint8))


def overlay_png(original: Image.Image, unit_map: np.ndarray, spec: PreprocessSpec) -> bytes:
    return png_bytes(overlay_image(original, unit_map, spec))


def activation_grid_image(channels: np.ndarray) -> Image.Image:
    """(k, h, w) feature maps -> one image, a near-square grid, each channel scaled to
    [0, 1] on its own, strongest first (row by row)."""
    k, h, w = channels.shape
    cols = max(1, math.ceil(math.sqrt(k)))
    rows = max(1, math.ceil(k / cols))
    zoom = max(1, math.ceil(GRID_TILE_MIN / max(1, min(h, w))))
    th, tw = h * zoom, w * zoom
    grid = np.full(
        (rows * th + (rows + 1) * GRID_GAP, cols * tw + (cols + 1) * GRID_GAP, 3), 255, np.uint8
    )
    for i in range(k):
        c = channels[i].astype(np.float32)
        lo, hi = float(c.min()), float(c.max())
        unit = (c - lo) / (hi - lo) if hi > lo else np.zeros_like(c)
        tile = np.repeat(np.repeat(colourise(unit, GRID_COLORMAP), zoom, 0), zoom, 1)
        r, col = divmod(i, cols)
        y, x = GRID_GAP + r * (th + GRID_GAP), GRID_GAP + col * (tw + GRID_GAP)
        grid[y : y + th, x : x + tw] = tile
    return Image.fromarray(grid)


def activation_grid_png(channels: np.ndarray) -> bytes:
    return png_bytes(activation_grid_image(channels))


def depth_tile(stages: list[tuple[str, np.ndarray]]) -> int:
    """The side of every tile of the depth view: DEPTH_TILE_MIN, or the largest stage's
    own side when that is larger (never shrunk)."""
    largest = max((max(c.shape[-2:]) for _, c in stages), default=1)
    return max(DEPTH_TILE_MIN, int(largest))


def depth_image(stages: list[tuple[str, np.ndarray]]) -> Image.Image:
    """One row per (label, channels (k, h, w)), shallow stage first: the label, then the
    k channels, strongest first, each scaled to [0, 1] on its own and enlarged (nearest,
    so the stage's cells stay visible) to depth_tile() x depth_tile() px."""
    from PIL import ImageDraw

    tile = depth_tile(stages)
    cols = max((c.shape[0] for _, c in stages), default=1)
    rows = len(stages)
    width = DEPTH_LABEL_WIDTH + cols * tile + (cols + 1) * GRID_GAP
    height = rows * tile + (rows + 1) * GRID_GAP
    canvas = np.full((height, width, 3), 255, np.uint8)
    for r, (_, channels) in enumerate(stages):
        y = GRID_GAP + r * (tile + GRID_GAP)
        for c, channel in enumerate(channels):
            x = DEPTH_LABEL_WIDTH + GRID_GAP + c * (tile + GRID_GAP)
            canvas[y : y + tile, x : x + tile] = _nearest(
                colourise(_unit(channel), GRID_COLORMAP), tile
            )
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    for r, (label, channels) in enumerate(stages):
        y = GRID_GAP + r * (tile + GRID_GAP) + tile // 2
        k, h, w = channels.shape
        draw.text((6, y - 12), label, fill=(0, 0, 0))
        draw.text((6, y + 2), f"{h}x{w} px, top {k}", fill=(90, 90, 90))
    return image


def depth_png(stages: list[tuple[str, np.ndarray]]) -> bytes:
    return png_bytes(depth_image(stages))


def _unit(channel: np.ndarray) -> np.ndarray:
    c = channel.astype(np.float32)
    lo, hi = float(c.min()), float(c.max())
    return (c - lo) / (hi - lo) if hi > lo else np.zeros_like(c)


def _nearest(rgb: np.ndarray, size: int) -> np.ndarray:
    """(h, w, 3) -> (size, size, 3), each output pixel the input cell it falls in."""
    h, w = rgb.shape[:2]
    rows = (np.arange(size) * h) // size
    cols = (np.arange(size) * w) // size
    out: np.ndarray = rgb[rows][:, cols]
    return out


def npy_bytes(raw: np.ndarray) -> bytes:
    """The map as float32 `.npy`, values as they are (nothing rounded, clipped or scaled)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(raw, dtype=np.float32), allow_pickle=False)
    return buf.getvalue()
