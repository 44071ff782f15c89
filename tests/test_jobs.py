"""The service/worker contract: torch-free, JSON only, deterministic ids, find-or-enqueue."""

from __future__ import annotations

import json
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import pytest

from lantern.core.errors import JobError
from lantern.core.jobs import (
    JOB_FUNCTION,
    META_ERROR,
    ExplainRequest,
    JobStatus,
    Method,
    find_or_enqueue,
    image_name,
    image_names,
    is_explain_job_id,
    job_status,
    make_job_id,
    parse_request,
)
from lantern.core.settings import Settings
from lantern.core.store import DirectoryStore, write_manifest
from tests.worker_fixtures import settings_for, shape_png

IMAGES = [("a", b"\x89PNG one"), ("b", b"\x89PNG two")]
MODEL = "lantern-classifier:abc123"


def test_the_contract_imports_without_torch() -> None:
    code = (
        "import sys, lantern.core.jobs, lantern.core.store; "
        "bad = [m for m in ('torch', 'torchvision', 'workers') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_job_ids_are_deterministic_and_cover_every_input() -> None:
    base: dict[str, Any] = {
        "images": IMAGES,
        "model": MODEL,
        "methods": ["gradcam", "saliency"],
        "targets": [None, 1],
        "layer": "layer4",
    }
    job_id = make_job_id(**base)
    assert is_explain_job_id(job_id)
    assert make_job_id(**{**base, "methods": ["saliency", Method.GRADCAM]}) == job_id
    variants = [
        {"images": [("a", b"\x89PNG one"), ("b", b"\x89PNG two!")]},
        {"images": [("a", b"\x89PNG one"), ("c", b"\x89PNG two")]},
        {"model": "lantern-classifier:other"},
        {"methods": ["gradcam"]},
        {"targets": [None, 2]},
        {"targets": None},
        {"layer": "layer3"},
        {"activation_layer": "layer2"},
    ]
    ids = {make_job_id(**{**base, **v}) for v in variants}
    assert job_id not in ids and len(ids) == len(variants)
    assert not is_explain_job_id("ex-../../etc") and not is_explain_job_id(job_id.upper())


def test_payload_validation_says_what_is_wrong() -> None:
    good = {
        "model": MODEL,
        "methods": ["gradcam"],
        "targets": [None],
        "images": [{"name": "a", "data_b64": "aGk="}],
    }
    request = parse_request(good)
    assert request.layer == "layer4" and request.effective_activation_layer == "layer4"
    cases = [
        ({"targets": [None, 1]}, "2 targets for 1 images"),
        ({"methods": ["lime"]}, "methods.0"),
        ({"methods": []}, "methods"),
        ({"targets": [-1]}, "targets must be class indices"),
        ({"images": [{"name": "../a", "data_b64": "aGk="}]}, "image name"),
        ({"images": [{"name": "a", "data_b64": "aGk=", "ref": "inputs/a"}]}, "exactly one"),
        ({"images": [{"name": "a", "ref": "inputs/../../etc/passwd"}]}, "ref must be"),
        ({"layer": "layer4; rm -rf"}, "is not a layer name"),
        ({"pickle": "x"}, "pickle"),
    ]
    for change, message in cases:
        with pytest.raises(JobError, match="invalid explanation request") as info:
            parse_request({**good, **change})
        assert message in str(info.value), (change, str(info.value))


def test_image_names_from_upload_file_names() -> None:
    assert image_name("my cat.jpg", 0) == "00-my_cat"
    assert image_name("../../etc/passwd", 3) == "03-passwd"
    assert image_name(None, 2) == "image-02"
    assert image_name("...", 1) == "image-01"


def test_a_request_keeps_the_names_the_user_sent_and_indexes_only_to_disambiguate() -> None:
    assert image_names(["cats/tom.jpg", "my cat.png", "dog.webp"]) == ["tom", "my_cat", "dog"]
    # a repeated stem or an empty one gets its index; unique stems stay as sent
    assert image_names(["a.png", "b.png", "a.jpg", None, "..."]) == [
        "00-a", "b", "02-a", "image-03", "image-04",
    ]  # fmt: skip
    # an indexed name never takes a name another upload sent
    assert image_names(["a.png", "00-a.png", "a.png"]) == ["00-a-2", "00-a", "02-a"]
    names = image_names(["x.png"] * 3 + ["01-x.png", "image-04.png", ""])
    assert len(set(names)) == len(names) == 6
    for name in names:  # every name is one the job contract accepts
        ExplainRequest.model_validate(
            {"model": "m:v", "methods": ["gradcam"], "targets": [None],
             "images": [{"name": name, "data_b64": ""}]}
        )  # fmt: skip


def stored_job_data(conn: Any, job_id: str) -> list[Any]:
    raw = conn.hget(f"rq:job:{job_id}", "data")
    return list(json.loads(zlib.decompress(raw)))  # JSON, not pickle


@pytest.mark.integration
def test_find_or_enqueue_stores_json_and_finds_an_identical_request(
    redis_conn: Any, tmp_path: Path
) -> None:
    settings = settings_for("unused", tmp_path, inline_image_bytes=200, job_retries=2)
    store = DirectoryStore(tmp_path)
    small, large = shape_png(0, size=8), shape_png(1, size=64)
    assert len(small) <= 200 < len(large)
    images = [("small", small), ("large", large)]
    job_id, created = find_or_enqueue(
        redis_conn, store, images, MODEL, ["gradcam", "saliency"], [None, 3], settings=settings
    )
    assert created and is_explain_job_id(job_id)
    again, created_again = find_or_enqueue(
        redis_conn, store, images, MODEL, ["saliency", "gradcam"], [None, 3], settings=settings
    )
    assert (again, created_again) == (job_id, False)
    assert redis_conn.llen(f"rq:queue:{settings.queue}") == 1  # enqueued once

    func, instance, args, kwargs = stored_job_data(redis_conn, job_id)
    assert func == JOB_FUNCTION and instance is None and kwargs == {}
    request = ExplainRequest.model_validate(args[0])
    assert [im.name for im in request.images] == ["small", "large"]
    assert request.images[0].data_b64 is not None  # small: inline
    assert request.images[1].ref == "inputs/large" and request.images[1].data_b64 is None
    assert store.read(job_id, "inputs/large") == large
    assert request.targets == [None, 3]

    job = redis_conn.hgetall(f"rq:job:{job_id}")
    assert int(job[b"timeout"]) == settings.job_timeout_seconds
    assert int(job[b"result_ttl"]) == settings.job_ttl_seconds
    assert int(job[b"retries_left"]) == 2
    status = job_status(redis_conn, job_id, store, settings)
    assert status == {
        "id": job_id,
        "status": JobStatus.QUEUED,
        "progress": {"done": 0, "total": 2},
        "error": None,
        "manifest": None,
    }


@pytest.mark.integration
def test_status_of_unknown_finished_and_failed_jobs(redis_conn: Any, tmp_path: Path) -> None:
    from rq.job import Job
    from rq.serializers import JSONSerializer

    settings = settings_for("unused", tmp_path)
    store = DirectoryStore(tmp_path)
    assert job_status(redis_conn, "ex-" + "0" * 32, store, settings) is None
    assert job_status(redis_conn, "../../etc", store, settings) is None

    # Redis forgot the job (restart, expiry) but its manifest survives in the store.
    gone = "ex-" + "1" * 32
    write_manifest(store, gone, {"images": [{"name": "a"}, {"name": "b"}]})
    status = job_status(redis_conn, gone, store, settings)
    assert status is not None and status["status"] == JobStatus.FINISHED
    assert status["progress"] == {"done": 2, "total": 2} and status["manifest"]["images"]

    # A failed job reports the worker's readable reason, and an identical request re-runs it.
    job_id, _ = find_or_enqueue(redis_conn, store, IMAGES, MODEL, ["saliency"], settings=settings)
    job = Job.fetch(job_id, connection=redis_conn, serializer=JSONSerializer)
    job.meta[META_ERROR] = "image 'a' is not an image Lantern can read"
    job.save_meta()
    job.set_status("failed")
    status = job_status(redis_conn, job_id, store, settings)
    assert status is not None and status["status"] == JobStatus.FAILED
    assert status["error"] == "image 'a' is not an image Lantern can read"
    again, created = find_or_enqueue(
        redis_conn, store, IMAGES, MODEL, ["saliency"], settings=settings
    )
    assert (again, created) == (job_id, True)
    assert job_status(redis_conn, job_id, store, settings)["status"] == JobStatus.QUEUED  # type: ignore[index]


def test_find_or_enqueue_refuses_too_many_images(tmp_path: Path) -> None:
    settings = Settings(max_images_per_job=1, artifact_dir=tmp_path)  # type: ignore[call-arg]
    with pytest.raises(JobError, match="limit is 1"):
        find_or_enqueue(
            None, DirectoryStore(tmp_path), IMAGES, MODEL, ["saliency"], settings=settings
        )  # type: ignore[arg-type]
