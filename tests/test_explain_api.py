"""Asynchronous explanations end to end, over HTTP, with real processes: redis-server,
`lantern worker` and `lantern serve`."""

from __future__ import annotations

import io
import time
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import TINY_CLASSES, TINY_SIZE
from tests.service_fixtures import SERVER_MAX_BATCH_BYTES
from tests.stack_fixtures import Stack, stack  # noqa: F401  (fixture)
from tests.worker_fixtures import shape_png

pytestmark = pytest.mark.integration

SIZES = [(64, 64), (96, 64), (50, 80)]  # original sizes: square, landscape, portrait


def _images() -> list[tuple[str, tuple[str, bytes, str]]]:
    files = []
    for i, (w, h) in enumerate(SIZES):
        data = shape_png(i, size=h, width=w)
        files.append(("images", (f"shape {i}.png", data, "image/png")))
    return files


def _wait_finished(url: str, job_id: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    seen_progress = []
    while True:
        status = httpx.get(f"{url}/jobs/{job_id}", timeout=10).json()
        seen_progress.append(status["progress"]["done"])
        if status["status"] in ("finished", "failed"):
            status["_progress_seen"] = seen_progress
            return status
        assert time.monotonic() < deadline, f"job still {status['status']} after {timeout}s"
        time.sleep(0.3)


@pytest.fixture(scope="module")
def finished(stack: Stack) -> dict[str, Any]:  # noqa: F811
    response = httpx.post(
        f"{stack.url}/explain",
        params={"methods": "gradcam,saliency", "targets": "1,,3"},
        files=_images(),
        timeout=30,
    )
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["status"] == "queued" and body["cached"] is False
    assert body["status_url"] == f"/jobs/{body['job_id']}"
    status = _wait_finished(stack.url, body["job_id"])
    assert status["status"] == "finished", status
    return status


def test_a_job_with_three_images_and_two_methods_finishes_with_a_matching_manifest(
    finished: dict[str, Any],
) -> None:
    manifest = finished["manifest"]
    assert finished["progress"] == {"done": 3, "total": 3}
    assert finished["error"] is None
    assert manifest["methods"] == ["gradcam", "saliency"]
    assert manifest["class_names"] == TINY_CLASSES
    images = manifest["images"]
    # the names the user sent ("shape 0.png" -> "shape_0"): unique, so no index is added
    assert [im["name"] for im in images] == ["shape_0", "shape_1", "shape_2"]
    assert images[0]["files"]["gradcam"]["heatmap"] == "shape_0.gradcam.heatmap.png"
    assert [im["original_size"] for im in images] == [list(s) for s in SIZES]
    # requested targets are used; the empty entry falls back to the image's own top class
    assert images[0]["target"]["index"] == 1 and images[0]["target"]["requested"] is True
    assert images[1]["target"]["index"] == images[1]["prediction"]["index"]
    assert images[2]["target"]["index"] == 3
    for im in images:
        assert im["prediction"]["label"] in TINY_CLASSES
        assert set(im["files"]) == {"gradcam", "saliency"}
        assert set(im["urls"]) == {
            f"{m}.{k}"
            for m in ("gradcam", "saliency")
            for k in ("heatmap", "overlay", "raw", "upsampled")
        }
    # the raw maps' native sizes, as the manifest says: layer4 of the 64-px model is 2 x 2
    assert manifest["maps"]["gradcam"]["shape"] == [2, 2]
    assert manifest["maps"]["saliency"]["shape"] == [TINY_SIZE, TINY_SIZE]


def test_every_artifact_downloads_with_the_right_type_and_size(
    stack: Stack,  # noqa: F811
    finished: dict[str, Any],
) -> None:
    for im, size in zip(finished["manifest"]["images"], SIZES, strict=True):
        for key, url in im["urls"].items():
            response = httpx.get(stack.url + url, timeout=10)
            assert response.status_code == 200, (url, response.text)
            method, kind = key.split(".", 1)
            if kind in ("raw", "upsampled"):
                assert response.headers["content-type"] == "application/octet-stream"
                raw = np.load(io.BytesIO(response.content))
                native = {"gradcam": (2, 2), "saliency": (TINY_SIZE, TINY_SIZE)}[method]
                expected_shape = native if kind == "raw" else (TINY_SIZE, TINY_SIZE)
                assert raw.dtype == np.float32 and raw.shape == expected_shape, key
                continue
            assert response.headers["content-type"] == "image/png"
            with Image.open(io.BytesIO(response.content)) as png:
                png.load()
                assert png.format == "PNG"
                expected = size if kind == "overlay" else (TINY_SIZE, TINY_SIZE)
                assert png.size == expected, (key, png.size)


def test_the_upsampled_map_and_the_heatmap_are_made_from_the_raw_map_as_documented(
    stack: Stack,  # noqa: F811
    finished: dict[str, Any],
) -> None:
    """README, "What a finished job holds": upsampled = the raw map, bilinear with
    align_corners=False, to the input size; heatmap = that map scaled between its minimum
    and its maximum (saliency: its 0.99 quantile), through the colour map."""
    import torch
    import torch.nn.functional as F

    from workers import render

    def download(url: str) -> bytes:
        response = httpx.get(stack.url + url, timeout=10)
        assert response.status_code == 200, (url, response.text)
        return response.content

    lut = render.colour_lut().astype(int)

    def index(rgb: np.ndarray) -> np.ndarray:
        """Each pixel's step of the 256-colour map (the nearest of its colours)."""
        found: np.ndarray = np.abs(rgb[..., None, :] - lut[None, None]).sum(-1).argmin(-1)
        return found

    top = {"gradcam": 1.0, "saliency": 0.99}
    for im in finished["manifest"]["images"]:
        for method, quantile in top.items():
            raw = np.load(io.BytesIO(download(im["urls"][f"{method}.raw"])))
            upsampled = np.load(io.BytesIO(download(im["urls"][f"{method}.upsampled"])))
            # In float64, the same interpolation: equal up to float32 rounding.
            expected = F.interpolate(
                torch.from_numpy(raw.astype(np.float64))[None, None],
                size=(TINY_SIZE, TINY_SIZE),
                mode="bilinear",
                align_corners=False,
            )[0, 0].numpy()
            scale = max(float(np.abs(expected).max()), 1e-30)
            assert np.abs(upsampled - expected).max() <= 1e-5 * scale, (im["name"], method)
            lo, hi = float(upsampled.min()), float(np.quantile(upsampled, quantile))
            unit = np.clip((upsampled.astype(np.float64) - lo) / max(hi - lo, 1e-12), 0, 1)
            with Image.open(io.BytesIO(download(im["urls"][f"{method}.heatmap"]))) as png:
                served = np.asarray(png.convert("RGB")).astype(int)
            mine = np.asarray(render.colourise(unit.astype(np.float32))).astype(int)
            # The colour of each pixel, at most one step of the 256-colour map apart
            # (the service scales in float32): compare through the map's own indices.
            assert np.abs(index(served) - index(mine)).max() <= 1, (im["name"], method)
            if quantile < 1.0:  # saliency's brightest 1 % is all at the top of the map
                brightest = index(served) == index(served).max()
                assert brightest.mean() >= 0.01 - 1 / upsampled.size, (im["name"], method)


def test_resubmitting_the_same_request_returns_the_finished_job_at_once(
    stack: Stack,  # noqa: F811
    finished: dict[str, Any],
) -> None:
    response = httpx.post(
        f"{stack.url}/explain",
        data={"methods": "saliency,gradcam", "targets": "1,,3"},  # as form fields this time
        files=_images(),
        timeout=30,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["cached"] is True and body["job_id"] == finished["job_id"]
    assert body["status"] == "finished"
    assert body["manifest"]["images"] == finished["manifest"]["images"]
    # a different request is a different job
    other = httpx.post(
        f"{stack.url}/explain", params={"methods": "gradcam"}, files=_images()[:1], timeout=30
    )
    assert other.status_code == 202 and other.json()["job_id"] != finished["job_id"]


@pytest.mark.parametrize(
    ("path", "status", "needle"),
    [
        ("/jobs/ex-" + "0" * 32, 404, "no job"),
        ("/jobs/not-a-job", 400, "not a job id"),
        ("/jobs/ex-" + "0" * 31 + "g", 400, "not a job id"),
        ("/jobs/ex-" + "0" * 32 + "/manifest.json", 404, "no file"),
    ],
)
def test_unknown_and_malformed_job_ids_are_refused(
    stack: Stack,  # noqa: F811
    path: str,
    status: int,
    needle: str,
) -> None:
    response = httpx.get(stack.url + path, timeout=10)
    assert response.status_code == status, response.text
    assert needle in response.json()["error"]


@pytest.mark.parametrize(
    "name",
    ["..%2F..%2Fetc%2Fpasswd", "%2E%2E/secret", "inputs/..%2F..%2Fx", "a/b/c.png", ".hidden"],
)
def test_artifact_paths_cannot_leave_the_store(
    stack: Stack,  # noqa: F811
    finished: dict[str, Any],
    name: str,
) -> None:
    response = httpx.get(f"{stack.url}/jobs/{finished['job_id']}/{name}", timeout=10)
    assert response.status_code in (400, 404), response.text
    assert "root:" not in response.text
    assert "error" in response.json()


@pytest.mark.parametrize(
    ("params", "files", "status", "needle"),
    [
        ({"methods": "gradcam"}, None, 400, "images"),
        ({"methods": "telepathy"}, "one", 422, "unknown method"),
        ({"methods": "gradcam", "targets": "1,2"}, "one", 422, "one per image"),
        ({"methods": "gradcam", "targets": "99"}, "one", 422, "out of range"),
        ({"methods": "gradcam", "targets": "unicorn"}, "one", 422, "nor a class name"),
        ({"layer": "layer4; rm -rf /"}, "one", 422, "is not a layer name"),
        ({"methods": "gradcam"}, "bad", 415, "not an image"),
    ],
)
def test_bad_explain_requests_get_a_readable_4xx(
    stack: Stack,  # noqa: F811
    params: dict[str, str],
    files: str | None,
    status: int,
    needle: str,
) -> None:
    upload = {
        None: None,
        "one": [_images()[0]],
        "bad": [("images", ("notes.png", b"these are not pixels", "image/png"))],
    }[files]
    # without images: a multipart form that carries only a text field
    sent = upload or [("methods", (None, "gradcam"))]
    response = httpx.post(f"{stack.url}/explain", params=params, files=sent, timeout=30)
    assert response.status_code == status, response.text
    assert needle in response.json()["error"]


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({"layer": "layer9"}, "no layer 'layer9'"),
        ({"layer": "fc"}, "layer 'fc' is not a convolutional feature map"),
        ({"layer": "avgpool"}, "layer 'avgpool' is not a convolutional feature map"),
        (
            {"methods": "saliency,activations", "activation_layer": "fc"},
            "layer 'fc' is not a convolutional feature map",
        ),
    ],
)
def test_a_layer_that_is_no_feature_map_is_refused_before_anything_is_queued(
    stack: Stack,  # noqa: F811
    params: dict[str, str],
    needle: str,
) -> None:
    import redis

    conn = redis.Redis.from_url(stack.redis.url)
    jobs_before = set(conn.scan_iter("rq:job:*"))
    response = httpx.post(f"{stack.url}/explain", params=params, files=_images()[:1], timeout=30)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert needle in error
    assert "'layer1', 'layer2', 'layer3', 'layer4'" in error and "GET /model" in error
    assert set(conn.scan_iter("rq:job:*")) == jobs_before  # nothing was queued
    conn.close()


def test_saliency_alone_reads_no_layer_so_any_layer_name_is_beside_the_point(
    stack: Stack,  # noqa: F811
) -> None:
    response = httpx.post(
        f"{stack.url}/explain",
        params={"methods": "saliency", "activation_layer": "fc"},
        files=_images()[:1],
        timeout=30,
    )
    assert response.status_code in (200, 202), response.text


def test_the_model_route_describes_the_model_and_its_explainable_layers(
    stack: Stack,  # noqa: F811
    tiny_bundle: Any,
) -> None:
    response = httpx.get(f"{stack.url}/model", timeout=10)
    assert response.status_code == 200, response.text
    info = response.json()
    assert info["tag"] == tiny_bundle.tag and info["version"] == tiny_bundle.version
    assert info["architecture"] == "resnet18" and info["class_names"] == TINY_CLASSES
    assert info["input_size"] == [TINY_SIZE, TINY_SIZE] and info["accuracy"] == 0.25
    layers = {layer["name"]: layer["shape"] for layer in info["explainable_layers"]}
    assert layers["layer4"] == [512, 2, 2] and layers["layer1"] == [64, 16, 16]
    assert "fc" not in layers and "avgpool" not in layers


def test_a_target_may_be_named_by_its_class_name(stack: Stack) -> None:  # noqa: F811
    name = TINY_CLASSES[2]
    response = httpx.post(
        f"{stack.url}/explain",
        params={"methods": "saliency", "targets": name},
        files=[_images()[0]],
        timeout=30,
    )
    assert response.status_code == 202, response.text
    status = _wait_finished(stack.url, response.json()["job_id"])
    assert status["status"] == "finished", status
    (image,) = status["manifest"]["images"]
    assert image["target"]["index"] == 2 and image["target"]["requested"] is True
    assert image["target"]["label"] == name


def test_an_explain_body_over_the_batch_byte_limit_is_refused(stack: Stack) -> None:  # noqa: F811
    size = SERVER_MAX_BATCH_BYTES // 4 + 1  # each image within its own limit, not all four
    files = [("images", (f"{i}.png", b"\x89" * size, "image/png")) for i in range(4)]
    response = httpx.post(f"{stack.url}/explain", files=files, timeout=30)
    assert response.status_code == 413, response.text
    assert f"larger than the limit of {SERVER_MAX_BATCH_BYTES:,} bytes" in response.json()["error"]


def test_too_many_images_in_one_job_is_refused(stack: Stack) -> None:  # noqa: F811
    files = [("images", (f"{i}.png", shape_png(i, size=16), "image/png")) for i in range(65)]
    response = httpx.post(f"{stack.url}/explain", files=files, timeout=30)
    assert response.status_code == 413, response.text
    assert "limit is 64" in response.json()["error"]


def test_the_page_and_the_api_docs_are_served(stack: Stack) -> None:  # noqa: F811
    page = httpx.get(f"{stack.url}/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<title>" in page.text and "Lantern" in page.text
    docs = httpx.get(f"{stack.url}/docs", timeout=10)
    assert (
        docs.status_code == 200
        and "/docs.json" in httpx.get(f"{stack.url}/static/docs.js", timeout=10).text
    )
    for asset in ("/static_content/swagger-ui-bundle.js", "/static_content/swagger-ui.css"):
        assert httpx.get(stack.url + asset, timeout=10).status_code == 200, asset
    spec = httpx.get(f"{stack.url}/docs.json", timeout=10).json()
    for path in ("/predict", "/predict_batch", "/explain", "/jobs/{job_id}"):
        assert path in spec["paths"], path
    missing = httpx.get(f"{stack.url}/static/..%2Fservice.py", timeout=10)
    assert missing.status_code == 404


def test_redis_down_gives_503_for_jobs_while_predict_keeps_working(stack: Stack) -> None:  # noqa: F811
    stack.redis.stop()  # last test of the module: the stack's own Redis goes away
    response = httpx.post(f"{stack.url}/explain", files=_images()[:1], timeout=30)
    assert response.status_code == 503, response.text
    assert "Redis" in response.json()["error"]
    status = httpx.get(f"{stack.url}/jobs/ex-" + "0" * 32, timeout=30)
    assert status.status_code == 503 and "unavailable" in status.json()["error"]
    predicted = httpx.post(
        f"{stack.url}/predict", files={"image": ("a.png", shape_png(0), "image/png")}, timeout=30
    )
    assert predicted.status_code == 200, predicted.text
    assert predicted.json()["label"] in TINY_CLASSES
    assert stack.server.process.poll() is None
