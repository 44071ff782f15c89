"""The Lantern ASGI app in-process (no server process): routes, answers and error bodies.

The service's micro-batcher runs here as it does under `bentoml serve`; batching under
concurrent load and /metrics are checked against a real server (test_service_server.py).
"""

from __future__ import annotations

import importlib
import os
import re
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from starlette.testclient import TestClient

from lantern.core.images import decode_image
from lantern.core.settings import get_settings
from service.classifier import softmax
from tests.conftest import TINY_CLASSES
from tests.service_fixtures import exif_rotated_jpeg, jpeg, png, png_header_only, truncated


@pytest.fixture(scope="module")
def client(tiny_bundle) -> Iterator[TestClient]:  # type: ignore[no-untyped-def]
    """The app BentoML builds for `Lantern`, with its lifespan (model loading) run."""
    saved = {k: os.environ.get(k) for k in ("LANTERN_MODEL", "LANTERN_MAX_UPLOAD_BYTES")}
    os.environ["LANTERN_MODEL"] = tiny_bundle.tag
    os.environ["LANTERN_MAX_UPLOAD_BYTES"] = "200000"
    get_settings.cache_clear()
    service = importlib.import_module("service.service")
    try:
        with TestClient(service.Lantern.to_asgi(), raise_server_exceptions=False) as c:
            # settings are read when the service starts, not when the module is imported
            assert c.get("/status").json()["predictions"]["model"] == tiny_bundle.tag
            yield c
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        get_settings.cache_clear()


def direct_probabilities(bundle: Any, data: bytes) -> np.ndarray:
    """The same preprocessing, then a plain ONNX Runtime session: what /predict must equal."""
    x = bundle.preprocess.apply_batch([decode_image(data, max_pixels=10**8)])
    session = ort.InferenceSession(str(bundle.onnx_path), providers=["CPUExecutionProvider"])
    return softmax(session.run(None, {"input": x})[0])[0]


def test_predict_answers_label_probability_top_k_and_version(
    client: TestClient, tiny_bundle
) -> None:  # type: ignore[no-untyped-def]
    data = jpeg(seed=3)
    r = client.post("/predict", files={"image": ("cat.jpg", data, "image/jpeg")})
    assert r.status_code == 200, r.text
    body = r.json()
    probs = direct_probabilities(tiny_bundle, data)
    best = int(np.argmax(probs))
    assert body["class_index"] == best and body["label"] == TINY_CLASSES[best]
    assert body["probability"] == pytest.approx(float(probs[best]), abs=1e-5)
    assert body["model_version"] == tiny_bundle.version
    assert len(body["top_k"]) == len(TINY_CLASSES)  # default k=5, clamped to 4 classes
    ranked = [e["probability"] for e in body["top_k"]]
    assert ranked == sorted(ranked, reverse=True)
    assert sum(ranked) == pytest.approx(1.0, abs=1e-5)
    assert body["top_k"][0] == {k: body[k] for k in ("label", "class_index", "probability")}


def test_top_k_is_a_parameter(client: TestClient) -> None:
    r = client.post("/predict?top_k=2", files={"image": ("a.png", png(), "image/png")})
    assert r.status_code == 200 and len(r.json()["top_k"]) == 2


def test_raw_image_body_is_accepted(client: TestClient, tiny_bundle) -> None:  # type: ignore[no-untyped-def]
    data = exif_rotated_jpeg()
    r = client.post("/predict", content=data, headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 200, r.text
    probs = direct_probabilities(tiny_bundle, data)
    assert r.json()["probability"] == pytest.approx(float(probs.max()), abs=1e-5)


def test_predict_batch_answers_each_image_in_order(client: TestClient, tiny_bundle) -> None:  # type: ignore[no-untyped-def]
    images = [jpeg(seed=s) for s in range(3)] + [png(seed=9)]
    files = [("images", (f"{i}.img", d, "application/octet-stream")) for i, d in enumerate(images)]
    r = client.post("/predict_batch?top_k=1", files=files)
    assert r.status_code == 200, r.text
    predictions = r.json()["predictions"]
    assert len(predictions) == len(images)
    for data, p in zip(images, predictions, strict=True):
        probs = direct_probabilities(tiny_bundle, data)
        assert p["class_index"] == int(np.argmax(probs))
        assert p["probability"] == pytest.approx(float(probs.max()), abs=1e-5)
        assert len(p["top_k"]) == 1


@pytest.mark.parametrize(
    ("kwargs", "status", "words"),
    [
        ({}, 400, "empty"),
        ({"files": {"photo": ("a.jpg", b"x", "image/jpeg")}}, 400, "missing form field 'image'"),
        ({"data": {"image": "not a file"}, "files": {"other": ("b", b"1")}}, 400, "must be a file"),
        ({"files": {"image": ("a.txt", b"hello world", "text/plain")}}, 415, "not an image"),
        ({"content": b"{}", "headers": {"Content-Type": "application/json"}}, 415, "Content-Type"),
        ({"content": b"hi", "headers": {"Content-Type": "text/plain"}}, 415, "Content-Type"),
        (
            {"files": {"image": ("t.jpg", truncated(jpeg((300, 200))), "image/jpeg")}},
            422,
            "truncated",
        ),
        ({"files": {"image": ("z.png", png_header_only(0, 5), "image/png")}}, 422, "zero"),
        (
            {"files": {"image": ("bomb.png", png_header_only(60_000, 60_000), "image/png")}},
            413,
            "pixels",
        ),
        ({"files": {"image": ("big.jpg", b"\xff" * 250_000, "image/jpeg")}}, 413, "limit"),
        ({"content": b"\xff" * 300_000, "headers": {"Content-Type": "image/jpeg"}}, 413, "limit"),
        (
            {"content": b"--x\r\nbroken", "headers": {"Content-Type": "multipart/form-data"}},
            400,
            "multipart",
        ),
    ],
    ids=[
        "empty-body",
        "missing-field",
        "text-field",
        "not-an-image",
        "json-body",
        "text-body",
        "truncated",
        "zero-size",
        "bomb",
        "file-too-big",
        "raw-body-too-big",
        "no-boundary",
    ],
)
def test_bad_input_gets_a_4xx_with_a_json_error(
    client: TestClient, kwargs: dict[str, Any], status: int, words: str
) -> None:
    r = client.post("/predict", **kwargs)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert set(body) == {"error"} and words in body["error"], body


def test_bad_top_k_is_a_422_with_a_json_error(client: TestClient) -> None:
    for value in ("0", "many"):
        r = client.post(f"/predict?top_k={value}", files={"image": ("a.png", png(), "image/png")})
        assert r.status_code == 422 and "top_k" in r.json()["error"], r.text


def test_one_bad_image_in_a_batch_names_it(client: TestClient) -> None:
    files = [
        ("images", ("good.jpg", jpeg(), "image/jpeg")),
        ("images", ("bad.jpg", b"nope", "image/jpeg")),
    ]
    r = client.post("/predict_batch", files=files)
    assert r.status_code == 415 and "images[1] (bad.jpg)" in r.json()["error"]


def test_predict_sends_several_images_to_predict_batch(client: TestClient) -> None:
    files = [("image", ("a.jpg", jpeg(), "image/jpeg")), ("image", ("b.jpg", jpeg(), "image/jpeg"))]
    r = client.post("/predict", files=files)
    assert r.status_code == 400 and "/predict_batch" in r.json()["error"]


def test_service_keeps_serving_after_bad_input(client: TestClient) -> None:
    for _ in range(3):
        assert (
            client.post(
                "/predict", content=b"junk", headers={"Content-Type": "image/png"}
            ).status_code
            == 415
        )
    assert (
        client.post("/predict", files={"image": ("a.jpg", jpeg(), "image/jpeg")}).status_code == 200
    )


def test_probes_metrics_and_openapi_docs(client: TestClient, tiny_bundle) -> None:  # type: ignore[no-untyped-def]
    assert client.get("/livez").status_code == 200
    assert client.get("/readyz").status_code == 200
    # /metrics itself is checked against the real server (test_service_server.py): BentoML's
    # multiprocess metrics collector needs `bentoml serve`. The gauge is registered here too.
    import prometheus_client

    metrics = prometheus_client.generate_latest().decode()
    labels = (
        f'architecture="resnet18",model="lantern-classifier",precision="fp32",'
        f'runtime="onnxruntime",version="{tiny_bundle.version}"'
    )
    assert f"lantern_model_info{{{labels}}} 1.0" in metrics
    spec = client.get("/docs.json").json()
    for path in ("/predict", "/predict_batch"):
        operation = spec["paths"][path]["post"]
        assert "multipart/form-data" in operation["requestBody"]["content"]
        assert {"200", "400", "413", "415", "422"} <= set(operation["responses"])
    assert client.get("/").status_code == 200  # the Swagger UI page


def test_an_overloaded_model_answers_503_with_a_json_error(client: TestClient) -> None:
    import threading

    import bentoml

    from service.batcher import MicroBatcher

    lantern = bentoml.get_current_service()
    release = threading.Event()

    def busy_model(batch: np.ndarray) -> np.ndarray:
        release.wait(10)
        return np.asarray(lantern.probabilities(batch))

    saved = lantern.batcher
    lantern.batcher = MicroBatcher(busy_model, max_batch_size=4, max_queue_wait_s=0.2)
    first: dict[str, Any] = {}
    running = threading.Thread(
        target=lambda: first.update(r=client.post("/predict", files={"image": ("a.png", png())}))
    )
    try:
        running.start()
        time.sleep(0.5)  # the first request now holds the model
        r = client.post("/predict", files={"image": ("b.png", png())})
        assert r.status_code == 503, r.text
        assert set(r.json()) == {"error"} and "overloaded" in r.json()["error"]
        assert r.headers["Retry-After"] == "1"  # what lantern.client waits before retrying
    finally:
        release.set()
        running.join(10)
        client.portal.call(lantern.batcher.aclose)  # type: ignore[union-attr]
        lantern.batcher = saved
    assert first["r"].status_code == 200, first["r"].text


def test_every_error_answer_carries_a_request_id_too(client: TestClient) -> None:
    """README: "X-Request-ID is on every response" — the errors included, which are
    answered by different layers (routing, upload limits, validation, decoding, BentoML's
    own refusal on the /v1 door), all inside the request-id middleware."""
    big = b"\xff\xd8" + b"\0" * 300_000  # past this app's 200 kB upload limit
    answers = {
        "unknown route": client.get("/no/such/route"),
        "upload too large": client.post("/predict", files={"image": ("a.jpg", big)}),
        "unsupported type": client.post(
            "/predict", content=b"x", headers={"Content-Type": "text/plain"}
        ),
        "bad parameter": client.post("/predict?top_k=0", files={"image": ("a.jpg", jpeg())}),
        "not an image": client.post("/predict", files={"image": ("a.jpg", b"not an image")}),
        "unknown job": client.get("/jobs/not-a-job-id"),
        "bentoml's refusal": client.post(
            "/v1/predict", content=b"x", headers={"Content-Type": "application/vnd.bentoml+pickle"}
        ),
    }
    for what, response in answers.items():
        assert response.status_code >= 400, (what, response.status_code)
        assert re.fullmatch(
            r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}", response.headers.get("x-request-id", "")
        ), (
            what,
            dict(response.headers),
        )
    sent = client.post(
        "/predict", files={"image": ("a.jpg", b"nope")}, headers={"X-Request-ID": "mine-1"}
    )
    assert sent.status_code >= 400 and sent.headers["x-request-id"] == "mine-1"
