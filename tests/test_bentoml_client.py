"""BentoML's own clients against a real Lantern: `bentoml.SyncHTTPClient`,
`bentoml.AsyncHTTPClient`, and a second BentoML service calling it through
`bentoml.depends(url=...)`, each a real process on loopback (a redis-server, a
`lantern worker`, a `lantern serve` with LANTERN_API_KEYS, and `bentoml serve` of
tests/bentoml_caller.py).

Every BentoML-native endpoint (/v1/predict, /v1/predict_batch, /v1/explain,
/v1/job_status) answers what its FastAPI twin answers, and bad input is the service's own
4xx `{"error": ...}`, which the client raises as a BentoMLException subclass carrying the
message — never a 500.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import bentoml
import httpx
import pytest
from bentoml.exceptions import BentoMLException

from tests.conftest import free_port
from tests.service_fixtures import SERVER_MAX_BATCH_IMAGES, png, truncated
from tests.stack_fixtures import Stack, start_stack, stop_stack
from tests.worker_fixtures import shape_png

pytestmark = pytest.mark.integration

KEY = "bentoml-client-key-" + "c" * 20
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def stack(tiny_bundle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:  # type: ignore[no-untyped-def]
    running = start_stack(
        tiny_bundle.tag,
        tmp_path_factory.mktemp("bentoml-client"),
        server_env={"LANTERN_API_KEYS": KEY},
    )
    yield running
    stop_stack(running)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("images")
    files = {
        "cat.png": png(seed=1),
        "dog.png": png(seed=2),
        "square.png": shape_png(1),
        "broken.png": truncated(png(seed=3)),
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return {name: folder / name for name in files}


@pytest.fixture(scope="module")
def client(stack: Stack) -> Iterator[bentoml.SyncHTTPClient]:
    with bentoml.SyncHTTPClient(stack.url, token=KEY) as c:
        yield c


def _fastapi(
    stack: Stack, path: str, headers: dict[str, str] | None = None, **kwargs: object
) -> httpx.Response:
    return httpx.post(stack.url + path, headers={**AUTH, **(headers or {})}, timeout=30, **kwargs)  # type: ignore[arg-type]


def _error(exc: pytest.ExceptionInfo[BentoMLException]) -> tuple[int, str]:
    """(status, message) of what the client raised: the service's own error body."""
    body = json.loads(str(exc.value))
    assert set(body) == {"error"}, body
    return exc.value.error_code.value, body["error"]


def test_the_client_finds_every_bentoml_endpoint_and_the_web_routes_still_answer(
    stack: Stack, client: bentoml.SyncHTTPClient
) -> None:
    assert {"predict", "predict_batch", "explain", "job_status"} <= set(client.endpoints)
    assert {e.route for e in client.endpoints.values()} == {
        "/v1/predict",
        "/v1/predict_batch",
        "/v1/explain",
        "/v1/job_status",
    }
    # The FastAPI routes the page and lantern.client use keep their own behaviour:
    # a raw image body and ?top_k= on /predict.
    raw = _fastapi(
        stack,
        "/predict?top_k=2",
        content=png(seed=1),
        headers={"Content-Type": "image/png"},
    )
    assert raw.status_code == 200 and len(raw.json()["top_k"]) == 2
    # Without the key, the client cannot even read the endpoints: a 401.
    with pytest.raises(BentoMLException):
        bentoml.SyncHTTPClient(stack.url).predict  # noqa: B018


def test_predict_and_predict_batch_answer_what_the_fastapi_routes_answer(
    stack: Stack, client: bentoml.SyncHTTPClient, images: dict[str, Path]
) -> None:
    answer = client.predict(image=images["cat.png"], top_k=3)
    same = _fastapi(stack, "/predict?top_k=3", files={"image": images["cat.png"].read_bytes()})
    assert answer == same.json()
    assert len(answer["top_k"]) == 3 and answer["precision"] in ("fp32", "int8", "fp16")

    batch = client.predict_batch(images=[images["cat.png"], images["dog.png"]])
    files = [("images", images[n].read_bytes()) for n in ("cat.png", "dog.png")]
    assert batch == _fastapi(stack, "/predict_batch", files=files).json()
    # One micro-batcher and one model behind both doors: the same answer for the same image.
    assert batch["predictions"][0] == client.predict(image=images["cat.png"])


def test_bad_input_is_the_services_4xx_raised_as_a_readable_error(
    client: bentoml.SyncHTTPClient, images: dict[str, Path]
) -> None:
    with pytest.raises(BentoMLException) as corrupt:
        client.predict(image=images["broken.png"])
    status, message = _error(corrupt)
    assert status == 422 and "broken.png" in message

    with pytest.raises(BentoMLException) as too_many:
        client.predict_batch(images=[images["cat.png"]] * (SERVER_MAX_BATCH_IMAGES + 1))
    status, message = _error(too_many)
    assert status == 413 and f"the limit is {SERVER_MAX_BATCH_IMAGES}" in message

    with pytest.raises(BentoMLException) as bad_k:
        client.predict(image=images["cat.png"], top_k=0)
    status, message = _error(bad_k)
    assert status == 422 and "top_k" in message

    with pytest.raises(BentoMLException) as layer:
        client.explain(images=[images["cat.png"]], layer="fc")
    status, message = _error(layer)
    assert status == 422 and "layer4" in message  # names the valid stages

    with pytest.raises(BentoMLException) as not_an_id:
        client.job_status(job_id="nope")
    assert _error(not_an_id) == (400, "'nope' is not a job id (expected 'ex-' and 32 hex digits)")

    with pytest.raises(BentoMLException) as unknown:
        client.job_status(job_id="ex-" + "f" * 32)
    assert _error(unknown)[0] == 404


def test_explain_queues_a_job_that_job_status_follows_to_its_manifest(
    stack: Stack, client: bentoml.SyncHTTPClient, images: dict[str, Path]
) -> None:
    submitted = client.explain(images=[images["square.png"]], methods="gradcam,saliency")
    assert submitted["job_id"].startswith("ex-") and submitted["status_url"].startswith("/jobs/")
    # The same request through the FastAPI door is the same job.
    twin = _fastapi(
        stack,
        "/explain",
        files={"images": ("square.png", images["square.png"].read_bytes())},
        data={"methods": "gradcam,saliency"},
    )
    assert twin.json()["job_id"] == submitted["job_id"] and twin.json()["cached"] is True
    deadline = time.monotonic() + 60
    while (status := client.job_status(job_id=submitted["job_id"]))["status"] != "finished":
        assert status["status"] in ("queued", "started"), status
        assert time.monotonic() < deadline, status
        time.sleep(0.3)
    urls = status["manifest"]["images"][0]["urls"]
    assert "gradcam.heatmap" in urls and "saliency.heatmap" in urls
    fastapi_status = httpx.get(stack.url + submitted["status_url"], headers=AUTH, timeout=10)
    assert fastapi_status.json() == status


def test_the_async_client_predicts_explains_and_raises_the_same_errors(
    stack: Stack, images: dict[str, Path]
) -> None:
    async def run() -> None:
        async with bentoml.AsyncHTTPClient(stack.url, token=KEY) as client:
            answers = await asyncio.gather(
                *(client.predict(image=images["cat.png"], top_k=2) for _ in range(4))
            )
            assert all(a == answers[0] for a in answers) and len(answers[0]["top_k"]) == 2
            batch = await client.predict_batch(images=[images["dog.png"]])
            assert len(batch["predictions"]) == 1
            job = await client.explain(images=[images["dog.png"]])
            assert (await client.job_status(job_id=job["job_id"]))["job_id"] == job["job_id"]
            with pytest.raises(BentoMLException) as corrupt:
                await client.predict_batch(images=[images["cat.png"], images["broken.png"]])
            status, message = _error(corrupt)
            assert status == 422 and "broken.png" in message
            with pytest.raises(BentoMLException) as layer:
                await client.explain(
                    images=[images["dog.png"]], methods="activations", activation_layer="avgpool"
                )
            assert _error(layer)[0] == 422

    asyncio.run(run())


@pytest.fixture(scope="module")
def caller(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """tests/bentoml_caller.py served by `bentoml serve` on another free port."""
    port = free_port()
    log = tmp_path_factory.mktemp("caller") / "caller.log"
    env = {
        **os.environ,
        "LANTERN_URL": stack.url,
        "BENTO_CLOUD_API_KEY": KEY,  # what BentoML's client sends as Bearer token
        "BENTOML_DO_NOT_TRACK": "true",
        "BENTOML_HOME": str(log.parent / "bentoml"),
    }
    root = Path(__file__).resolve().parents[1]
    command = [
        str(Path(sys.executable).with_name("bentoml")),
        "serve",
        "tests.bentoml_caller:Caller",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=root, env=env, stdout=out, stderr=out)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, log.read_text(errors="replace")[-3000:]
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
            time.sleep(0.25)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def test_another_bentoml_service_calls_lantern_through_bentoml_depends(
    caller: str, client: bentoml.SyncHTTPClient, images: dict[str, Path]
) -> None:
    with bentoml.SyncHTTPClient(caller) as other:
        answer = other.classify(image=images["cat.png"])
        direct = client.predict(image=images["cat.png"], top_k=1)
        assert answer == {"label": direct["label"], "model_version": direct["model_version"]}
        # Lantern's 422 travels through the other service: its client raises it, readable.
        with pytest.raises(BentoMLException) as corrupt:
            other.classify(image=images["broken.png"])
        assert corrupt.value.error_code.value == 422
        assert "broken.png" in str(corrupt.value) and "corrupt" in str(corrupt.value).lower()


def test_no_bentoml_route_shadows_a_fastapi_route() -> None:
    """BentoML 1.4 matches `@bentoml.api` routes before the mounted FastAPI app
    (service.native explains), so one at /predict would take it from the web page."""
    from service.api import app
    from service.gateway import _route_paths
    from service.service import Lantern

    bentoml_routes = {method.route for method in Lantern.apis.values()}
    assert bentoml_routes == {"/v1/predict", "/v1/predict_batch", "/v1/explain", "/v1/job_status"}
    assert not bentoml_routes & set(_route_paths(app.routes))


@pytest.mark.parametrize("path", ["/v1/explain", "/explain"])
def test_an_option_sent_twice_is_refused_not_guessed(
    stack: Stack,
    images: dict[str, Path],
    path: str,
) -> None:
    """Repeated text fields (model twice, force twice) would otherwise count as the last
    one sent, silently; the door says so instead (both doors read the form alike)."""
    image = images["cat.png"].read_bytes()
    files = [
        ("images", ("cat.png", image, "image/png")),
        ("model", (None, "latest")),
        ("model", (None, "other")),
        ("force", (None, "true")),
        ("force", (None, "false")),
    ]
    r = _fastapi(stack, path, files=files)
    assert r.status_code == 400, r.text
    assert r.json() == {
        "error": "form field(s) 'force', 'model' sent more than once; send each option once"
    }
