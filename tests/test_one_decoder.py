"""One decoder: what the worker's manifest records for an image is what /predict answers.

`/predict`, `/explain`'s validation and the worker all decode with lantern.core.images.
Over an odd-format corpus (transparency, palettes, 16-bit grey, CMYK, EXIF rotation,
animation, a photo-sized JPEG that /predict decodes at reduced scale and the worker whole,
for its overlays and the manifest's original size), each image is explained through the
real stack and predicted through the real API: the class agrees and so does its
probability (ONNX Runtime against PyTorch on the same weights: 1e-3 is far below what a
differently decoded picture moves, and far above float32 rounding).
"""

from __future__ import annotations

import io
import time
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.service_fixtures import encode, exif_rotated_jpeg
from tests.stack_fixtures import Stack, stack  # noqa: F401  (fixture)

pytestmark = pytest.mark.integration


def _picture(seed: int, size: tuple[int, int] = (80, 64)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize(size, Image.Resampling.BICUBIC))


def _half_transparent(mode: str) -> Image.Image:
    rgba = np.dstack([_picture(1), np.full((64, 80), 255, np.uint8)])
    rgba[:, :40] = 0  # left half: transparent black (white in a viewer)
    image = Image.fromarray(rgba, "RGBA")
    return image.convert("LA") if mode == "LA" else image


def _palette_with_transparency() -> bytes:
    image = Image.fromarray(_picture(2)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pixels = np.asarray(image).copy()
    pixels[:, :30] = 0
    out = Image.fromarray(pixels, "P")
    out.putpalette(image.getpalette() or [])
    return encode(out, "PNG", transparency=0)


def _grey16() -> bytes:
    values = np.full((64, 80), 40000, np.uint16)
    values[:, 40:] = 12000
    return encode(Image.fromarray(values, mode="I;16"), "PNG")


def _large_jpeg() -> bytes:
    """1200x900 with fine grain: at the test model's input size /predict decodes it at 1/8
    scale (lantern.core.images, reduce_for), the worker whole."""
    rng = np.random.default_rng(7)
    grain = rng.integers(-40, 41, (900, 1200, 3))
    pixels = np.clip(_picture(8, (1200, 900)).astype(int) + grain, 0, 255).astype(np.uint8)
    return encode(Image.fromarray(pixels), "JPEG", quality=90)


def _animated() -> bytes:
    frames = [Image.fromarray(_picture(3)), Image.fromarray(_picture(4))]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)


CORPUS: dict[str, tuple[bytes, str]] = {
    "rgba.png": (encode(_half_transparent("RGBA"), "PNG"), "image/png"),
    "la.png": (encode(_half_transparent("LA"), "PNG"), "image/png"),
    "rgba.webp": (encode(_half_transparent("RGBA"), "WEBP", lossless=True), "image/webp"),
    "palette.png": (_palette_with_transparency(), "image/png"),
    "grey16.png": (_grey16(), "image/png"),
    "cmyk.jpg": (encode(Image.fromarray(_picture(5)).convert("CMYK"), "JPEG"), "image/jpeg"),
    "cmyk.tiff": (encode(Image.fromarray(_picture(6)).convert("CMYK"), "TIFF"), "image/tiff"),
    "exif.jpg": (exif_rotated_jpeg(), "image/jpeg"),
    "animated.gif": (_animated(), "image/gif"),
    "large.jpg": (_large_jpeg(), "image/jpeg"),
}


def _explained(stack: Stack) -> dict[str, Any]:  # noqa: F811
    files = [("images", (name, data, ctype)) for name, (data, ctype) in CORPUS.items()]
    r = httpx.post(f"{stack.url}/explain", params={"methods": "saliency"}, files=files, timeout=60)
    assert r.status_code in (200, 202), r.text
    deadline = time.monotonic() + 180
    while (status := httpx.get(f"{stack.url}/jobs/{r.json()['job_id']}", timeout=10).json())[
        "status"
    ] not in ("finished", "failed"):
        assert time.monotonic() < deadline, status
        time.sleep(0.3)
    assert status["status"] == "finished", status
    return dict(status["manifest"])


def test_the_worker_records_the_prediction_that_predict_answers_for_every_odd_format(
    stack: Stack,  # noqa: F811
) -> None:
    for name, (data, _) in CORPUS.items():
        odd = Image.open(io.BytesIO(data)).mode not in ("RGB",)
        assert odd or name in ("exif.jpg", "large.jpg"), name
    manifest = _explained(stack)
    assert len(manifest["images"]) == len(CORPUS)
    for entry, (name, (data, ctype)) in zip(manifest["images"], CORPUS.items(), strict=True):
        assert entry["name"].endswith(name.rsplit(".", 1)[0]), (entry["name"], name)
        answer = httpx.post(
            f"{stack.url}/predict", files={"image": (name, data, ctype)}, timeout=30
        ).json()
        stored = entry["prediction"]
        assert stored["index"] == answer["class_index"], (name, stored, answer)
        assert abs(stored["probability"] - answer["probability"]) < 1e-3, (name, stored, answer)
