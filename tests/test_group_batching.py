"""Jobs explained in groups (workers.worker.ExplainWorker, workers.tasks.prepare_group),
against a real redis-server and real `lantern worker` processes, with jobs enqueued the
way the service enqueues them (find_or_enqueue): one-image jobs are explained together,
each gets what a solo run gives, a corrupt image fails only its own job, and a worker
killed mid-group leaves every job of the group to a second worker."""

from __future__ import annotations

import io
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lantern.core.jobs import JobStatus, find_or_enqueue, job_status
from lantern.core.store import DirectoryStore
from tests.worker_fixtures import settings_for, shape_png, start_worker, wait_for, worker_env

pytestmark = pytest.mark.integration
ALL_METHODS = ["gradcam", "gradcam_pp", "saliency", "activations"]


def enqueue_one_image_jobs(
    redis_conn: Any, store: DirectoryStore, settings: Any, bundle: Any, images: list[bytes]
) -> list[str]:
    ids = []
    for i, data in enumerate(images):
        job_id, created = find_or_enqueue(
            redis_conn, store, [(f"img{i:02d}", data)], bundle.tag, ALL_METHODS, settings=settings
        )
        assert created
        ids.append(job_id)
    return ids


def load_npy(store: DirectoryStore, job_id: str, name: str) -> np.ndarray:
    array: np.ndarray = np.load(io.BytesIO(store.read(job_id, name)), allow_pickle=False)
    return array


def relative_l2(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return float(np.linalg.norm(a64 - b64) / max(np.linalg.norm(b64), 1e-12))


def test_one_image_jobs_are_explained_together_as_they_are_alone(
    redis_server: Any, redis_conn: Any, tiny_bundle: Any, tmp_path: Path, worker_processes: list
) -> None:
    from workers.worker import META_GROUP, ExplainWorker

    images = [shape_png(i) for i in range(6)]
    corrupt = b"\x89PNG\r\n\x1a\n this is not an image"

    # Solo: the same jobs, one at a time (grouping off), in this process.
    solo_dir = tmp_path / "solo"
    solo_settings = settings_for(redis_server.url, solo_dir, explain_group_jobs=1)
    solo_store = DirectoryStore(solo_dir)
    solo_ids = enqueue_one_image_jobs(redis_conn, solo_store, solo_settings, tiny_bundle, images)
    ExplainWorker(redis_conn, solo_settings).work(burst=True)
    solo = {}
    for job_id in solo_ids:
        status = job_status(redis_conn, job_id, solo_store, solo_settings)
        assert status is not None and status["status"] == JobStatus.FINISHED, status
        assert META_GROUP not in (redis_conn.hget(f"rq:job:{job_id}", "meta") or b"").decode()
        solo[job_id] = status["manifest"]
    redis_conn.flushall()

    # Grouped: a real worker process takes all seven queued jobs as one group.
    group_dir = tmp_path / "grouped"
    settings = settings_for(redis_server.url, group_dir)
    store = DirectoryStore(group_dir)
    ids = enqueue_one_image_jobs(redis_conn, store, settings, tiny_bundle, [*images, corrupt])
    assert ids[:-1] == solo_ids  # the same requests name the same jobs
    env = worker_env(redis_server.url, group_dir, tiny_bundle.tag, LANTERN_EXPLAIN_CHUNK_SIZE="4")
    log_path = tmp_path / "worker.log"
    proc = start_worker(env, log_path, "--burst")
    worker_processes.append(proc)
    assert proc.wait(timeout=120) == 0, log_path.read_text()[-3000:]
    log = log_path.read_text()
    assert "explaining 7 jobs together" in log, log[-3000:]
    assert "explained 6 image(s) of 6 job(s) together" in log, log[-3000:]

    # The corrupt image fails its own job, with its own readable reason, and no other.
    bad = job_status(redis_conn, ids[-1], store, settings)
    assert bad is not None and bad["status"] == JobStatus.FAILED
    assert "img06" in bad["error"] and bad["manifest"] is None, bad["error"]
    assert redis_conn.hget(f"rq:job:{ids[-1]}", "retries_left") == b"0"

    for job_id in ids[:-1]:
        status = job_status(redis_conn, job_id, store, settings)
        assert status is not None and status["status"] == JobStatus.FINISHED, status
        assert status["progress"] == {"done": 1, "total": 1}
        from rq.job import Job
        from rq.serializers import JSONSerializer

        meta = Job.fetch(job_id, connection=redis_conn, serializer=JSONSerializer).meta
        assert meta[META_GROUP] == {"jobs": 6, "images": 6}
        grouped, alone = status["manifest"], solo[job_id]
        assert grouped.keys() == alone.keys()
        for key in grouped.keys() - {"job_id", "created_at", "images"}:
            assert grouped[key] == alone[key], key
        (entry,), (solo_entry,) = grouped["images"], alone["images"]
        assert entry["name"] == solo_entry["name"]
        for part in ("prediction", "target"):  # the same class, the same probability
            got, want = dict(entry[part]), dict(solo_entry[part])
            assert abs(got.pop("probability") - want.pop("probability")) < 1e-4, part
            assert got == want, part
        assert entry["files"].keys() == solo_entry["files"].keys()
        assert set(store.list_files(job_id)) == set(solo_store.list_files(job_id))
        for method, files in entry["files"].items():
            assert files == solo_entry["files"][method]
            for kind in ("raw", "upsampled"):
                got = load_npy(store, job_id, files[kind])
                want = load_npy(solo_store, job_id, files[kind])
                assert got.shape == want.shape and got.dtype == want.dtype
                assert relative_l2(got, want) < 1e-3, (job_id, method, kind)


def test_a_worker_killed_mid_group_leaves_every_job_to_another_worker(
    redis_server: Any, redis_conn: Any, tiny_bundle: Any, tmp_path: Path, worker_processes: list
) -> None:
    from rq.registry import StartedJobRegistry
    from rq.serializers import JSONSerializer

    store_dir = tmp_path / "artifacts"
    settings = settings_for(redis_server.url, store_dir, job_retries=2)
    store = DirectoryStore(store_dir)
    n = 24
    ids = enqueue_one_image_jobs(
        redis_conn, store, settings, tiny_bundle, [shape_png(i) for i in range(n)]
    )
    registry = StartedJobRegistry(settings.queue, connection=redis_conn, serializer=JSONSerializer)
    env = worker_env(redis_server.url, store_dir, tiny_bundle.tag, LANTERN_EXPLAIN_CHUNK_SIZE="1")
    first = start_worker(env, tmp_path / "killed.log")
    worker_processes.append(first)

    # The whole group is marked started by this one worker before its pass begins. Each
    # job enters StartedJobRegistry a round trip before its status says "started" (as RQ
    # orders a single job), so the wait is for both: on a fast CPU a kill as soon as the
    # registry was full caught the last job still "queued", half marked.
    def group_marked_started() -> bool:
        with redis_conn.pipeline() as pipe:
            for job_id in ids:
                pipe.hget(f"rq:job:{job_id}", "status")
            statuses = pipe.execute()
        return registry.count >= n and all(s in (b"started", b"finished") for s in statuses)

    wait_for(group_marked_started, 90, "the group to be marked started", poll=0.02)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)
    statuses = [job_status(redis_conn, job_id, store, settings) for job_id in ids]
    # Every job was claimed: it either finished before the kill (chunks of one image finish
    # one by one, and RQ clears a finished job's worker_name) or is still held, all of the
    # held ones by the one worker that was killed.
    assert all(
        s is not None and s["status"] in (JobStatus.STARTED, JobStatus.FINISHED) for s in statuses
    ), statuses
    unfinished = [s["id"] for s in statuses if s is not None and s["status"] == JobStatus.STARTED]
    assert len(unfinished) >= 2, "the group finished before the worker could be killed"
    names = {redis_conn.hget(f"rq:job:{job_id}", "worker_name") for job_id in unfinished}
    assert len(names) == 1 and None not in names and b"" not in names, names
    assert redis_conn.llen(f"rq:queue:{settings.queue}") == 0  # all of them were claimed
    wait_for(lambda: registry.get_expired_job_ids(), 15, "the dead worker's leases to lapse")

    second = start_worker(env, tmp_path / "second.log", "--burst")
    worker_processes.append(second)
    assert second.wait(timeout=120) == 0, (tmp_path / "second.log").read_text()[-3000:]
    for job_id in ids:
        status = job_status(redis_conn, job_id, store, settings)
        assert status is not None and status["status"] == JobStatus.FINISHED, status
        assert [im["name"] for im in status["manifest"]["images"]] == [
            f"img{ids.index(job_id):02d}"
        ]
    for job_id in unfinished:
        assert redis_conn.hget(f"rq:job:{job_id}", "retries_left") == b"1"  # one retry spent
    assert registry.get_job_ids() == []


def test_a_job_a_dead_worker_claimed_but_had_not_marked_started_is_retried(
    redis_server: Any, redis_conn: Any, tiny_bundle: Any, tmp_path: Path, worker_processes: list
) -> None:
    """A kill can land between the two writes that start a job (the group test above once
    did, on a fast CPU): the job is in StartedJobRegistry and RQ's intermediate queue, but
    its status still says queued. The state is built here with RQ's own calls, a worker's
    dequeue move and prepare_execution, after which that worker does nothing more, as if
    killed. Maintenance drops the lapsed lease, leaves the job a minute in the intermediate
    queue (RQ's rule, `IntermediateQueue.should_be_cleaned_up`), then retries it: it
    finishes, one retry spent."""
    from rq.intermediate_queue import IntermediateQueue
    from rq.registry import StartedJobRegistry
    from rq.serializers import JSONSerializer

    from workers.worker import ExplainWorker, LanternJob

    store_dir = tmp_path / "artifacts"
    settings = settings_for(redis_server.url, store_dir, job_retries=2)
    store = DirectoryStore(store_dir)
    (job_id,) = enqueue_one_image_jobs(redis_conn, store, settings, tiny_bundle, [shape_png(0)])
    dead = ExplainWorker(redis_conn, settings)
    queue = dead.queues[0]
    moved = redis_conn.lmove(queue.key, queue.intermediate_queue_key, "LEFT", "RIGHT")
    assert moved == job_id.encode()
    dead.prepare_execution(
        LanternJob.fetch(job_id, connection=redis_conn, serializer=JSONSerializer)
    )
    assert redis_conn.hget(f"rq:job:{job_id}", "status") == b"queued"
    registry = StartedJobRegistry(settings.queue, connection=redis_conn, serializer=JSONSerializer)
    assert registry.get_job_ids() == [job_id]
    wait_for(lambda: registry.get_expired_job_ids(), 30, "the dead worker's lease to lapse")

    env = worker_env(redis_server.url, store_dir, tiny_bundle.tag)
    first = start_worker(env, tmp_path / "first.log", "--burst")
    worker_processes.append(first)
    assert first.wait(timeout=120) == 0, (tmp_path / "first.log").read_text()[-3000:]
    status = job_status(redis_conn, job_id, store, settings)
    assert status is not None and status["status"] == JobStatus.QUEUED, status  # not yet
    intermediate = IntermediateQueue(queue.key, connection=redis_conn)
    wait_for(lambda: intermediate.should_be_cleaned_up(job_id), 90, "RQ's minute", poll=1)

    second = start_worker(env, tmp_path / "second.log", "--burst")
    worker_processes.append(second)
    assert second.wait(timeout=120) == 0, (tmp_path / "second.log").read_text()[-3000:]
    status = job_status(redis_conn, job_id, store, settings)
    assert status is not None and status["status"] == JobStatus.FINISHED, status
    assert redis_conn.hget(f"rq:job:{job_id}", "retries_left") == b"1"
    assert redis_conn.llen(queue.intermediate_queue_key) == 0


def test_only_jobs_with_the_same_model_methods_and_layers_share_a_group_of_at_most_the_cap(
    redis_server: Any, redis_conn: Any, tiny_bundle: Any, tmp_path: Path, worker_processes: list
) -> None:
    import re

    from workers.tasks import group_key

    store_dir = tmp_path / "artifacts"
    settings = settings_for(redis_server.url, store_dir)
    store = DirectoryStore(store_dir)
    kinds = {
        "A": {"methods": ["gradcam"], "layer": "layer4"},
        "B": {"methods": ["saliency"], "layer": "layer4"},
        "C": {"methods": ["gradcam"], "layer": "layer3"},
        "D": {"methods": ["gradcam"], "layer": "layer4", "activation_layer": "layer2"},
    }
    order = "ABACADAAB"  # interleaved, as unrelated users would queue them
    kind_of: dict[str, str] = {}
    for i, kind in enumerate(order):
        job_id, created = find_or_enqueue(
            redis_conn,
            store,
            [(f"img{i:02d}", shape_png(i))],
            tiny_bundle.tag,
            settings=settings,
            **kinds[kind],  # type: ignore[arg-type]
        )
        assert created
        kind_of[job_id] = kind
    cap = 3
    env = worker_env(
        redis_server.url, store_dir, tiny_bundle.tag, LANTERN_EXPLAIN_GROUP_JOBS=str(cap)
    )
    log = tmp_path / "worker.log"
    worker = start_worker(env, log, "--burst")
    worker_processes.append(worker)
    assert worker.wait(timeout=240) == 0, log.read_text(errors="replace")[-3000:]

    for job_id in kind_of:
        status = job_status(redis_conn, job_id, store, settings)
        assert status is not None and status["status"] == JobStatus.FINISHED, status
    text = log.read_text(errors="replace")
    groups = [
        m.group(2).split(", ") for m in re.finditer(r"explaining (\d+) jobs together: (.+)", text)
    ]
    grouped = [job_id for group in groups for job_id in group]
    assert len(grouped) == len(set(grouped)), groups  # no job in two groups
    for group in groups:
        assert 2 <= len(group) <= cap, groups
        assert len({kind_of[job_id] for job_id in group}) == 1, groups
    # The five A jobs do not fit in one group of three: three, then two; the two B jobs,
    # queued apart, still find each other; C and D, one job each, run alone.
    sizes = {kind: sorted(len(g) for g in groups if kind_of[g[0]] == kind) for kind in kinds}
    assert sizes == {"A": [2, 3], "B": [2], "C": [], "D": []}, groups
    # group_key tells the kinds apart, and only them.
    keys = {kind: group_key({"model": tiny_bundle.tag, **spec}) for kind, spec in kinds.items()}
    assert len(set(keys.values())) == len(kinds), keys
    swapped = group_key({"model": tiny_bundle.tag, "methods": ["saliency", "gradcam"]})
    assert swapped == group_key({"model": tiny_bundle.tag, "methods": ["gradcam", "saliency"]})
