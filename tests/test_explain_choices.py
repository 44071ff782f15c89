"""Choosing the model version per request, and forcing a recompute, over the real stack
(redis-server, `lantern worker`, `lantern serve`): /explain with `model=` and `force=`.

A second version of the tiny model is registered here the way conftest registers the
first (models.export.export_checkpoint), with other random weights, so the two versions
answer differently and their jobs can be told apart.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from lantern.core.jobs import make_job_id
from tests.conftest import TINY_ARCH, TINY_CLASSES, TINY_SIZE
from tests.stack_fixtures import Stack, stack  # noqa: F401  (fixture)
from tests.worker_fixtures import shape_png

pytestmark = pytest.mark.integration


def register(model: Any, tmp: Path, accuracy: float) -> Any:
    """Register `model` as a new version of the tiny model; its bundle."""
    from lantern.core.preprocess import PreprocessSpec
    from models.checkpoint import save_checkpoint
    from models.export import export_checkpoint

    ckpt = save_checkpoint(
        tmp / "best.pt",
        model,
        architecture=TINY_ARCH,
        class_names=TINY_CLASSES,
        spec=PreprocessSpec(crop_size=TINY_SIZE, resize_size=TINY_SIZE),
        training={"mode": "all", "dataset": "shapes", "epochs": 0},
        metrics={"accuracy": accuracy},
    )
    return export_checkpoint(ckpt)


@pytest.fixture(scope="module")
def second_bundle(tiny_bundle: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    import torch

    from models.network import build_model

    torch.manual_seed(1)
    model = build_model(TINY_ARCH, len(TINY_CLASSES), weights="none")
    bundle = register(model, tmp_path_factory.mktemp("second"), 0.3)
    assert bundle.tag != tiny_bundle.tag
    return bundle


def _files(n: int = 1) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("images", (f"shape{i}.png", shape_png(i), "image/png")) for i in range(n)]


def _explain(url: str, expect: int | tuple[int, ...] = 202, **params: str) -> dict[str, Any]:
    response = httpx.post(f"{url}/explain", params=params, files=_files(), timeout=30)
    allowed = (expect,) if isinstance(expect, int) else expect
    assert response.status_code in allowed, response.text
    body: dict[str, Any] = response.json()
    return body


def _finished(url: str, job_id: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        status: dict[str, Any] = httpx.get(f"{url}/jobs/{job_id}", timeout=10).json()
        if status["status"] in ("finished", "failed"):
            assert status["status"] == "finished", status
            return status
        assert time.monotonic() < deadline, f"job {job_id} still {status['status']}"
        time.sleep(0.2)


def test_two_model_versions_explain_the_same_image_side_by_side(
    stack: Stack,  # noqa: F811
    tiny_bundle: Any,
    second_bundle: Any,
) -> None:
    served = _explain(stack.url, (200, 202), methods="gradcam")
    chosen = _explain(stack.url, (200, 202), methods="gradcam", model=second_bundle.version)
    assert chosen["job_id"] != served["job_id"]
    # the whole tag names the same job as the bare version
    again = _explain(stack.url, 200, methods="gradcam", model=second_bundle.tag)
    assert again["job_id"] == chosen["job_id"] and again["cached"] is True
    first = _finished(stack.url, served["job_id"])["manifest"]
    second = _finished(stack.url, chosen["job_id"])["manifest"]
    assert first["model"] == tiny_bundle.tag and second["model"] == second_bundle.tag
    # the job id is the contract's, over the concrete version
    data = shape_png(0)
    assert chosen["job_id"] == make_job_id([("shape0", data)], second_bundle.tag, ["gradcam"], None)
    assert served["job_id"] == make_job_id([("shape0", data)], tiny_bundle.tag, ["gradcam"], None)
    # other weights, other answers
    p1 = first["images"][0]["prediction"]["probability"]
    p2 = second["images"][0]["prediction"]["probability"]
    assert p1 != p2


@pytest.mark.parametrize(
    ("model", "status", "needle"),
    [
        ("0123456789abcdef", 404, "the model store has no model 'lantern-classifier:0123456789"),
        ("no-such-model:v1", 404, "no model 'no-such-model:v1'"),
        ("../../etc/passwd", 422, "is not a model version"),
        ("a:b:c", 422, "is not a model version"),
    ],
)
def test_a_model_version_the_store_lacks_is_a_readable_404_and_nothing_is_queued(
    stack: Stack,  # noqa: F811
    model: str,
    status: int,
    needle: str,
) -> None:
    import redis

    conn = redis.Redis.from_url(stack.redis.url)
    before = set(conn.scan_iter("rq:job:*"))
    body = _explain(stack.url, status, model=model)
    assert needle in body["error"], body
    if status == 404:
        assert "lantern models list" in body["error"]
    assert set(conn.scan_iter("rq:job:*")) == before
    conn.close()


def test_targets_are_checked_against_the_chosen_version(
    stack: Stack,  # noqa: F811
    second_bundle: Any,
) -> None:
    body = _explain(stack.url, 422, targets="9", model=second_bundle.version)
    assert "out of range" in body["error"]


@pytest.mark.parametrize("value", ["maybe", "2"])
def test_force_and_faithfulness_must_be_true_or_false(
    stack: Stack,  # noqa: F811
    value: str,
) -> None:
    for name in ("force", "faithfulness"):
        response = httpx.post(
            f"{stack.url}/explain", data={name: value}, files=_files(), timeout=30
        )
        assert response.status_code == 422, response.text
        assert name in response.json()["error"]


def test_force_recomputes_a_finished_job_under_the_same_id(
    stack: Stack,  # noqa: F811
) -> None:
    first = _explain(stack.url, (200, 202), methods="saliency", targets="2")
    done = _finished(stack.url, first["job_id"])
    manifest = stack.artifact_dir / first["job_id"] / "manifest.json"
    assert manifest.exists()
    stale = stack.artifact_dir / first["job_id"] / "stale.txt"
    stale.write_text("from the first run")
    # without force: the finished job, at once
    cached = _explain(stack.url, 200, methods="saliency", targets="2")
    assert cached["cached"] is True and cached["manifest"] == done["manifest"]
    # with force (as a form field): queued afresh, same id, old files gone
    response = httpx.post(
        f"{stack.url}/explain",
        data={"methods": "saliency", "targets": "2", "force": "true"},
        files=_files(),
        timeout=30,
    )
    assert response.status_code == 202, response.text
    forced = response.json()
    assert forced["job_id"] == first["job_id"] and forced["cached"] is False
    assert not stale.exists()
    again = _finished(stack.url, forced["job_id"])
    assert again["manifest"]["created_at"] > done["manifest"]["created_at"]
    assert again["manifest"]["images"][0]["target"]["index"] == 2


def test_force_leaves_a_job_that_is_still_queued_alone(
    redis_conn: Any, tmp_path: Path, tiny_bundle: Any
) -> None:
    """No worker runs here: the job stays queued, and force does not delete it."""
    from lantern.core.jobs import find_or_enqueue, job_status
    from lantern.core.store import DirectoryStore
    from tests.worker_fixtures import settings_for

    settings = settings_for("redis://unused", tmp_path / "artifacts")
    store = DirectoryStore(tmp_path / "artifacts")
    images = [("a", shape_png(0))]
    job_id, created = find_or_enqueue(
        redis_conn, store, images, tiny_bundle.tag, ["gradcam"], settings=settings
    )
    assert created
    again, created = find_or_enqueue(
        redis_conn, store, images, tiny_bundle.tag, ["gradcam"], settings=settings, force=True
    )
    assert (again, created) == (job_id, False)
    status = job_status(redis_conn, job_id, store, settings)
    assert status is not None and status["status"] == "queued"


def test_faithfulness_is_part_of_the_job_id_and_its_absence_keeps_the_old_id() -> None:
    images = [("a", b"pixels")]
    plain = make_job_id(images, "m:v", ["gradcam"], None)
    assert make_job_id(images, "m:v", ["gradcam"], None, faithfulness=False) == plain
    assert make_job_id(images, "m:v", ["gradcam"], None, faithfulness=True) != plain
    # the id every job had before the option existed (a manifest on disk still matches)
    assert plain == "ex-" + _old_job_id(images, "m:v", ["gradcam"])


def _old_job_id(images: list[tuple[str, bytes]], model: str, methods: list[str]) -> str:
    import hashlib
    import json

    key = {
        "v": 1,
        "model": model,
        "methods": sorted(methods),
        "targets": [None] * len(images),
        "layer": "layer4",
        "activation_layer": "layer4",
        "images": [[n, hashlib.sha256(d).hexdigest()] for n, d in images],
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
