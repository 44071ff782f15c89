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
from tests.conftest import TINY_ARCH, TINY_CLASSES, register_tiny
from tests.stack_fixtures import Stack, stack  # noqa: F401  (fixture)
from tests.worker_fixtures import shape_png

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def second_bundle(tiny_bundle: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    import torch

    from models.network import build_model

    torch.manual_seed(1)
    model = build_model(TINY_ARCH, len(TINY_CLASSES), weights="none")
    bundle = register_tiny(tmp_path_factory.mktemp("second"), model, accuracy=0.3)
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


# --- faithfulness through the real worker ------------------------------------------------

DETECTOR_IMAGES = (0, 1, 2, 3)  # one of each shape


def detector_model() -> Any:
    """ResNet-18 with hand-set weights that respond to the shape's pixels, and only them.

    conv1 + bn1 + ReLU: channel 0 is how far the 2x2 mean of the pixel's red + green +
    blue (in [0, 1] units, undoing the normalisation) exceeds 1.2; the shapes' colours
    are 130..255 a channel, the backgrounds 0..90, so it is the shape's mask. Every
    stage then carries channel 0 on: the first block of layers 2-4 averages it over 3x3
    at stride 2 (its downsample branch is zeroed), every other block is the identity
    (its last BatchNorm scaled to zero). The class-0 logit rises with the pooled map.
    """
    import torch

    from lantern.core.preprocess import IMAGENET_MEAN, IMAGENET_STD
    from models.network import build_model

    model = build_model(TINY_ARCH, len(TINY_CLASSES), weights="none")
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.zero_()
                m.running_var.fill_(1.0)
                m.weight.fill_(1.0)
                m.bias.zero_()
        for c in range(3):
            model.conv1.weight[0, c, 3:5, 3:5] = IMAGENET_STD[c] / 4
        model.bn1.bias[0] = sum(IMAGENET_MEAN) - 1.2
        for name in ("layer1", "layer2", "layer3", "layer4"):
            stage = getattr(model, name)
            for block in stage:
                if block.downsample is not None:
                    block.conv1.weight[0, 0] = 1 / 9
                    block.conv2.weight[0, 0, 1, 1] = 1.0
                else:
                    block.bn2.weight.zero_()
        model.fc.weight[0, 0] = 120.0
        model.fc.bias[0] = -2.0
    return model.eval()


@pytest.fixture(scope="module")
def detector_bundle(tiny_bundle: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    return register_tiny(tmp_path_factory.mktemp("detector"), detector_model(), accuracy=1.0)


def _object_mass(saliency: Any, box: tuple[int, int, int, int]) -> float:
    left, top, right, bottom = box
    inside = saliency[top:bottom, left:right].sum()
    return float(inside / saliency.sum())


def test_faithfulness_scores_maps_that_point_at_the_object_above_random_and_inverted(
    stack: Stack,  # noqa: F811
    detector_bundle: Any,
) -> None:
    import io

    import numpy as np
    import torch

    from models.data import draw_shape
    from workers import faithfulness as fa
    from workers.model_cache import ModelCache

    files = [("images", (f"s{i}.png", shape_png(i), "image/png")) for i in DETECTOR_IMAGES]
    params = {
        "methods": "gradcam,saliency",
        "targets": ",".join("0" for _ in DETECTOR_IMAGES),
        "model": detector_bundle.version,
        "faithfulness": "true",
    }
    response = httpx.post(f"{stack.url}/explain", params=params, files=files, timeout=30)
    assert response.status_code == 202, response.text
    job_id = response.json()["job_id"]
    plain = httpx.post(
        f"{stack.url}/explain", params={**params, "faithfulness": "false"}, files=files, timeout=30
    )
    assert plain.json()["job_id"] != job_id  # part of the job id
    manifest = _finished(stack.url, job_id)["manifest"]
    assert manifest["model"] == detector_bundle.tag
    assert manifest["faithfulness"]["steps"] == 16
    assert manifest["faithfulness"]["baseline"] == "mean"

    loaded = ModelCache(torch.device("cpu")).get(detector_bundle.tag)
    spec = loaded.spec
    figures = []
    for index, image in zip(DETECTOR_IMAGES, manifest["images"], strict=True):
        sample = draw_shape(index)
        x = torch.from_numpy(spec.apply_batch([sample.image]))[0]
        for method in ("gradcam", "saliency"):
            score = image["faithfulness"][method]
            assert set(score) >= {
                "deletion_auc",
                "insertion_auc",
                "random_deletion_auc",
                "random_insertion_auc",
                "steps",
                "baseline",
            }
            url = image["urls"][f"{method}.upsampled"]
            upsampled = np.load(io.BytesIO(httpx.get(stack.url + url, timeout=10).content))
            # the map points at the object (64 px crop of a 64 px image: same pixels): its
            # share inside the box is well above the box's share of the image (Grad-CAM's
            # 2 x 2 layer4 map is coarse, saliency sits on the shape's own pixels)
            left, top, right, bottom = sample.box
            area = (right - left) * (bottom - top) / upsampled.size
            mass = _object_mass(np.clip(upsampled, 0, None), sample.box)
            assert mass > 1.5 * area, (index, method, mass, area)
            # the inverted map, scored by the same code the worker runs
            inverted = fa.score_maps(
                loaded.model, x, {"inv": -torch.from_numpy(upsampled)}, 0, chunk_size=16
            )["inv"]
            assert score["deletion_auc"] < score["random_deletion_auc"], (index, method, score)
            assert score["random_deletion_auc"] < inverted["deletion_auc"], (index, method)
            assert score["insertion_auc"] > score["random_insertion_auc"], (index, method)
            assert score["random_insertion_auc"] > inverted["insertion_auc"], (index, method)
            figures.append(
                (
                    index,
                    method,
                    round(score["deletion_auc"], 3),
                    round(score["random_deletion_auc"], 3),
                    round(inverted["deletion_auc"], 3),
                    round(score["insertion_auc"], 3),
                    round(score["random_insertion_auc"], 3),
                    round(inverted["insertion_auc"], 3),
                    round(mass / area, 2),
                )
            )
    print(
        "image, method, deletion AUC map/random/inverted, insertion AUC map/random/inverted, "
        "map mass in the box / box area"
    )
    for row in figures:
        print(*row)
