"""The explanation worker against a real redis-server: real `lantern worker` processes,
JSON only, and a worker killed in the middle of a job."""

from __future__ import annotations

import io
import json
import os
import signal
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from lantern.core.jobs import JOB_FUNCTION, JobStatus, find_or_enqueue, job_status
from lantern.core.store import DirectoryStore
from tests.conftest import TINY_CLASSES, TINY_SIZE
from tests.worker_fixtures import (
    job_outcomes,
    settings_for,
    shape_png,
    start_worker,
    wait_for,
    worker_env,
)

pytestmark = pytest.mark.integration
ALL_METHODS = ["gradcam", "gradcam_pp", "saliency", "activations"]


def open_png(store: DirectoryStore, job_id: str, name: str) -> Image.Image:
    image = Image.open(io.BytesIO(store.read(job_id, name)))
    image.load()
    assert image.format == "PNG"
    return image


def test_a_worker_process_runs_a_job_end_to_end(
    redis_server: Any, redis_conn: Any, tiny_bundle: Any, tmp_path: Path, worker_processes: list
) -> None:
    store_dir = tmp_path / "artifacts"
    wide = shape_png(0, size=64, width=96)  # 96 x 64, travels inline
    big = shape_png(3, size=160)  # 160 x 160, larger: written to the store, passed by ref
    assert len(wide) < len(big)
    settings = settings_for(redis_server.url, store_dir, inline_image_bytes=len(wide))
    store = DirectoryStore(store_dir)
    images = [("wide", wide), ("big", big)]
    job_id, created = find_or_enqueue(
        redis_conn, store, images, tiny_bundle.tag, ALL_METHODS, [None, 2], settings=settings
    )
    assert created

    env = worker_env(redis_server.url, store_dir, tiny_bundle.tag)
    proc = start_worker(env, tmp_path / "worker.log", "--burst")
    worker_processes.append(proc)
    assert proc.wait(timeout=180) == 0, (tmp_path / "worker.log").read_text()[-3000:]

    status = job_status(redis_conn, job_id, store, settings)
    assert status is not None, (tmp_path / "worker.log").read_text()[-3000:]
    assert status["status"] == JobStatus.FINISHED, status["error"]
    assert status["progress"] == {"done": 2, "total": 2}
    manifest = status["manifest"]
    assert manifest["model"] == tiny_bundle.tag and manifest["methods"] == ALL_METHODS
    assert [im["name"] for im in manifest["images"]] == ["wide", "big"]

    sizes = {"wide": (96, 64), "big": (160, 160)}
    for entry, requested in zip(manifest["images"], [None, 2], strict=True):
        prediction, target = entry["prediction"], entry["target"]
        assert prediction["label"] == TINY_CLASSES[prediction["index"]]
        assert 0.0 <= prediction["probability"] <= 1.0
        expected_target = prediction["index"] if requested is None else requested
        assert target["index"] == expected_target and target["requested"] is (requested is not None)
        assert entry["original_size"] == list(sizes[entry["name"]])
        assert set(entry["files"]) == set(ALL_METHODS)
        for method, files in entry["files"].items():
            assert open_png(store, job_id, files["heatmap"]).size == (TINY_SIZE, TINY_SIZE)
            assert open_png(store, job_id, files["overlay"]).size == sizes[entry["name"]]
            raw = load_npy(store, job_id, files["raw"])
            assert raw.dtype == np.float32 and raw.shape == NATIVE[method], method
            assert files["raw"] == f"{entry['name']}.{method}.npy"
            upsampled = load_npy(store, job_id, files["upsampled"])
            assert upsampled.dtype == np.float32, method
            assert upsampled.shape == (TINY_SIZE, TINY_SIZE), method
        grid = open_png(store, job_id, entry["files"]["activations"]["grid"])
        assert grid.width > 100 and grid.height > 100
    for method in ALL_METHODS:
        described = manifest["maps"][method]
        assert described["shape"] == list(NATIVE[method]) and described["dtype"] == "float32"
        assert described["layer"] == (None if method == "saliency" else "layer4")
        assert described["upsampled"]["shape"] == [TINY_SIZE, TINY_SIZE]
        assert "bilinear" in described["upsampled"]["method"] and described["definition"]
    assert "after the ReLU, before any normalisation" in manifest["maps"]["gradcam"]["definition"]
    assert manifest["batchnorm"].startswith("folded")
    _raw_maps_are_what_the_engine_computes(store, job_id, manifest, tiny_bundle, images, [None, 2])

    listed = set(store.list_files(job_id))
    for entry in manifest["images"]:
        for files in entry["files"].values():
            assert {v for k, v in files.items() if k != "channel_index"} <= listed

    # An identical request finds the finished job instead of computing it again.
    assert find_or_enqueue(
        redis_conn, store, images, tiny_bundle.tag, ALL_METHODS, [None, 2], settings=settings
    ) == (job_id, False)


# The native (h, w) of each method's map for the 64-px tiny ResNet-18: layer4 is 64 / 32.
NATIVE = {
    "gradcam": (2, 2),
    "gradcam_pp": (2, 2),
    "activations": (2, 2),
    "saliency": (TINY_SIZE, TINY_SIZE),
}


def load_npy(store: DirectoryStore, job_id: str, name: str) -> np.ndarray:
    array: np.ndarray = np.load(io.BytesIO(store.read(job_id, name)), allow_pickle=False)
    return array


def _raw_maps_are_what_the_engine_computes(
    store: DirectoryStore, job_id: str, manifest: dict[str, Any], bundle: Any,
    images: list[tuple[str, bytes]], targets: list[int | None],
) -> None:  # fmt: skip
    """Each stored raw map equals the engine's map for that image, computed here in this
    process from the bundle's weights, as a picture: relative L2 error (float32 rounding
    and thread counts differ between processes; see tests/test_engine.py)."""
    import torch

    from lantern.core.images import decode_image
    from models.network import build_model, load_weights
    from workers.engine import explain, fold_batchnorm
    from workers.methods import make_method

    model = build_model(bundle.architecture, len(bundle.class_names), weights="none")
    load_weights(model, bundle.weights_path, bundle.architecture)
    fold_batchnorm(model.eval())
    methods = [make_method(m, "layer4") for m in ALL_METHODS]
    for (_, data), target, entry in zip(images, targets, manifest["images"], strict=True):
        x = torch.from_numpy(bundle.preprocess.apply_batch([decode_image(data, max_pixels=10**7)]))
        ex = explain(model, x, methods, [target])
        for method in ALL_METHODS:
            expected = ex.results[method].maps[0].numpy().astype(np.float64)
            stored = load_npy(store, job_id, entry["files"][method]["raw"]).astype(np.float64)
            assert stored.shape == expected.shape, method
            scale = np.linalg.norm(expected)
            assert scale > 0, method
            assert np.linalg.norm(stored - expected) / scale < 1e-4, method


class Exploit:
    """Unpickling this creates a directory: proof that a pickle payload was executed."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(self.marker),))


def test_the_worker_only_accepts_json_jobs(
    redis_server: Any, redis_conn: Any, tiny_bundle: Any, tmp_path: Path
) -> None:
    from rq import Queue
    from rq.serializers import JSONSerializer, PickleSerializer

    from workers.worker import ExplainWorker

    settings = settings_for(redis_server.url, tmp_path / "artifacts", job_retries=0)
    store = DirectoryStore(tmp_path / "artifacts")
    marker = tmp_path / "pwned"
    pickled = Queue(settings.queue, connection=redis_conn, serializer=PickleSerializer).enqueue(
        JOB_FUNCTION, Exploit(marker), job_id="ex-" + "e" * 32
    )
    job_id, _ = find_or_enqueue(
        redis_conn, store, [("a", shape_png(1))], tiny_bundle.tag, ["saliency"], settings=settings
    )
    # What Lantern stores is JSON: the function by name, the payload as a plain object.
    data = json.loads(zlib.decompress(redis_conn.hget(f"rq:job:{job_id}", "data")))
    assert data[0] == JOB_FUNCTION and data[2][0]["images"][0]["name"] == "a"

    with pytest.raises(ValueError, match="JSONSerializer"):
        ExplainWorker(redis_conn, settings, serializer=PickleSerializer)
    worker = ExplainWorker(redis_conn, settings)
    assert worker.serializer is JSONSerializer
    worker.work(burst=True)

    assert not marker.exists(), "a pickled payload was unpickled by the worker"
    rejected = job_status(redis_conn, pickled.id, store, settings)
    assert rejected is not None and rejected["status"] == JobStatus.FAILED
    assert "refused: not a Lantern job" in rejected["error"]
    assert "not readable JSON" in rejected["error"]
    accepted = job_status(redis_conn, job_id, store, settings)
    assert accepted is not None and accepted["status"] == JobStatus.FINISHED, accepted


def test_a_bad_request_fails_at_once_with_a_readable_reason(
    redis_server: Any, redis_conn: Any, tiny_bundle: Any, tmp_path: Path
) -> None:
    from workers.worker import ExplainWorker

    settings = settings_for(redis_server.url, tmp_path / "artifacts", job_retries=2)
    store = DirectoryStore(tmp_path / "artifacts")
    not_an_image = [("notes", b"this is text, not a picture")]
    job_id, _ = find_or_enqueue(
        redis_conn, store, not_an_image, tiny_bundle.tag, ["gradcam"], settings=settings
    )
    bad_layer, _ = find_or_enqueue(
        redis_conn, store, [("a", shape_png(2))], tiny_bundle.tag, ["gradcam"],
        layer="layer9", settings=settings,
    )  # fmt: skip
    head, _ = find_or_enqueue(
        redis_conn, store, [("b", shape_png(3))], tiny_bundle.tag, ["gradcam"],
        layer="fc", settings=settings,
    )  # fmt: skip
    ExplainWorker(redis_conn, settings).work(burst=True)  # would loop on retries if retried

    status = job_status(redis_conn, job_id, store, settings)
    assert status is not None and status["status"] == JobStatus.FAILED
    assert status["error"].startswith("image 'notes' is not an image Lantern can read")
    status = job_status(redis_conn, bad_layer, store, settings)
    assert status is not None and status["status"] == JobStatus.FAILED
    assert "no layer 'layer9'" in status["error"]
    assert redis_conn.hget(f"rq:job:{job_id}", "retries_left") == b"0"  # not retried
    # `fc` used to end in an IndexError, retried twice
    status = job_status(redis_conn, head, store, settings)
    assert status is not None and status["status"] == JobStatus.FAILED
    assert "layer 'fc' is not a convolutional feature map" in status["error"]
    assert "'layer4'" in status["error"]
    assert redis_conn.hget(f"rq:job:{bad_layer}", "retries_left") == b"0"
    assert redis_conn.hget(f"rq:job:{head}", "retries_left") == b"0"


def _start_long_job(
    redis_server: Any, redis_conn: Any, tiny_bundle: Any, tmp_path: Path, retries: int
) -> tuple[Any, DirectoryStore, str]:
    settings = settings_for(redis_server.url, tmp_path / "artifacts", job_retries=retries)
    store = DirectoryStore(tmp_path / "artifacts")
    images = [(f"img{i:02d}", shape_png(i)) for i in range(24)]
    job_id, _ = find_or_enqueue(
        redis_conn, store, images, tiny_bundle.tag, ALL_METHODS, settings=settings
    )
    return settings, store, job_id


def _kill_worker_mid_job(
    redis_server: Any, redis_conn: Any, tiny_bundle: Any, tmp_path: Path, job_id: str,
    settings: Any, store: DirectoryStore, procs: list,
) -> None:  # fmt: skip
    from rq.registry import StartedJobRegistry
    from rq.serializers import JSONSerializer

    env = worker_env(
        redis_server.url, tmp_path / "artifacts", tiny_bundle.tag, LANTERN_EXPLAIN_CHUNK_SIZE="1"
    )
    proc = start_worker(env, tmp_path / "killed.log")
    procs.append(proc)

    def started() -> bool:
        status = job_status(redis_conn, job_id, store, settings)
        return status is not None and status["progress"]["done"] >= 2

    wait_for(started, 120, "the first worker to get going")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    status = job_status(redis_conn, job_id, store, settings)
    assert status is not None and status["status"] == JobStatus.STARTED
    assert 2 <= status["progress"]["done"] < 24, "the job finished before it could be killed"
    registry = StartedJobRegistry(settings.queue, connection=redis_conn, serializer=JSONSerializer)
    # The dead worker's lease (three 1 s heartbeats) lapses within seconds.
    wait_for(lambda: registry.get_expired_job_ids(), 15, "the dead worker's lease to lapse")


def test_a_job_whose_worker_is_killed_is_retried_by_another_worker(
    redis_server: Any, redis_conn: Any, tiny_bundle: Any, tmp_path: Path, worker_processes: list
) -> None:
    settings, store, job_id = _start_long_job(redis_server, redis_conn, tiny_bundle, tmp_path, 2)
    _kill_worker_mid_job(
        redis_server, redis_conn, tiny_bundle, tmp_path, job_id, settings, store, worker_processes
    )
    env = worker_env(redis_server.url, tmp_path / "artifacts", tiny_bundle.tag)
    second = start_worker(env, tmp_path / "second.log", "--burst")
    worker_processes.append(second)
    assert second.wait(timeout=180) == 0, (tmp_path / "second.log").read_text()[-3000:]

    status = job_status(redis_conn, job_id, store, settings)
    assert status is not None and status["status"] == JobStatus.FINISHED, status
    assert status["progress"] == {"done": 24, "total": 24}
    assert len(status["manifest"]["images"]) == 24
    assert redis_conn.hget(f"rq:job:{job_id}", "retries_left") == b"1"  # one retry spent
    # /metrics' job outcomes count the killed attempt as retried (it was not timed).
    assert job_outcomes(redis_conn) == {"retried": 1, "finished": 1}
    # the second worker's maintenance released the dead worker's lease
    from rq.registry import StartedJobRegistry

    assert StartedJobRegistry(settings.queue, connection=redis_conn).get_job_ids() == []


def test_a_job_whose_worker_is_killed_without_retries_left_fails_visibly(
    redis_server: Any, redis_conn: Any, tiny_bundle: Any, tmp_path: Path, worker_processes: list
) -> None:
    from workers.worker import ExplainWorker

    settings, store, job_id = _start_long_job(redis_server, redis_conn, tiny_bundle, tmp_path, 0)
    _kill_worker_mid_job(
        redis_server, redis_conn, tiny_bundle, tmp_path, job_id, settings, store, worker_processes
    )
    ExplainWorker(redis_conn, settings).work(burst=True)  # its maintenance finds the job

    status = job_status(redis_conn, job_id, store, settings)
    assert status is not None and status["status"] == JobStatus.FAILED
    assert "worker running this job stopped" in status["error"]
    assert status["manifest"] is None
    assert job_outcomes(redis_conn) == {"failed": 1}
