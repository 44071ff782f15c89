"""LANTERN_JOB_TIMEOUT_SECONDS, "the longest a single job may run" (README, settings), held
to that with a real redis-server and a real `lantern worker` process.

The limit is RQ's job timeout, written into the job when it is enqueued
(lantern.core.jobs.enqueue_explain: job_timeout=settings.job_timeout_seconds, i.e. the
setting of whoever enqueues, the API) and enforced by the worker around the job's run
(RQ's death penalty, SIGALRM, in ExplainWorker, a SimpleWorker). A job far longer than the
limit (64 images, two methods and faithfulness curves: about 30 s on one 2-core CPU
against a 2 s limit) must be stopped, retried while it has retries, then end failed with a
reason a person can act on; it must not finish, stay "started", vanish, or take the worker
down with it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lantern.core.jobs import JobStatus, find_or_enqueue, job_status
from lantern.core.store import DirectoryStore
from tests.worker_fixtures import job_outcomes, settings_for, shape_png, start_worker, worker_env

pytestmark = pytest.mark.integration

TIMEOUT_S = 2
LONG_IMAGES = 64  # the most one job may carry (max_images_per_job)
LONG_METHODS = ["gradcam", "saliency"]


def _enqueue_long_and_short(
    redis_conn: Any, store: DirectoryStore, settings: Any, bundle: Any
) -> tuple[str, str]:
    long_images = [(f"img{i:02d}", shape_png(i)) for i in range(LONG_IMAGES)]
    long_id, created = find_or_enqueue(
        redis_conn, store, long_images, bundle.tag, LONG_METHODS, settings=settings,
        faithfulness=True,
    )  # fmt: skip
    assert created
    # Queued behind it with other methods (so it is not explained in the same group): the
    # worker must still be there to explain it once the long job has timed out.
    short_id, created = find_or_enqueue(
        redis_conn, store, [("short", shape_png(1))], bundle.tag, ["activations"],
        settings=settings,
    )  # fmt: skip
    assert created
    return long_id, short_id


def _run_worker_to_the_end(
    redis_server: Any, store_dir: Path, bundle: Any, tmp_path: Path, worker_processes: list
) -> str:
    env = worker_env(redis_server.url, store_dir, bundle.tag)
    log_path = tmp_path / "worker.log"
    proc = start_worker(env, log_path, "--burst")
    worker_processes.append(proc)
    # Two attempts cut at 2 s each and a one-image job, after the model loads; without the
    # limit the long job alone would run about 30 s an attempt on this machine's CPUs.
    assert proc.wait(timeout=300) == 0, log_path.read_text(errors="replace")[-3000:]
    return log_path.read_text(errors="replace")


def test_a_job_past_the_timeout_is_stopped_retried_then_failed_and_nothing_is_lost(
    redis_server: Any, redis_conn: Any, tiny_bundle: Any, tmp_path: Path, worker_processes: list
) -> None:
    from rq.registry import FailedJobRegistry, StartedJobRegistry
    from rq.serializers import JSONSerializer

    store_dir = tmp_path / "artifacts"
    settings = settings_for(
        redis_server.url, store_dir, job_timeout_seconds=TIMEOUT_S, job_retries=1
    )
    store = DirectoryStore(store_dir)
    long_id, short_id = _enqueue_long_and_short(redis_conn, store, settings, tiny_bundle)
    assert int(redis_conn.hget(f"rq:job:{long_id}", "timeout")) == TIMEOUT_S

    log = _run_worker_to_the_end(redis_server, store_dir, tiny_bundle, tmp_path, worker_processes)

    status = job_status(redis_conn, long_id, store, settings)
    assert status is not None, "the timed-out job vanished"
    assert status["status"] == JobStatus.FAILED, (status, log[-3000:])
    assert status["manifest"] is None and "manifest.json" not in store.list_files(long_id)
    # It was cut short, not run to the end: fewer images explained than it carried.
    assert status["progress"]["total"] == LONG_IMAGES
    assert status["progress"]["done"] < LONG_IMAGES, status["progress"]
    # The reason says it ran out of time, and what the limit was.
    error = status["error"]
    assert error and "time" in error.lower() and str(TIMEOUT_S) in error, error
    # Retried once (job_retries=1), then failed: both attempts are counted, none finished.
    outcomes = job_outcomes(redis_conn)
    assert outcomes.get("retried") == 1 and outcomes.get("failed") == 1, outcomes
    assert redis_conn.hget(f"rq:job:{long_id}", "retries_left") == b"0"
    # Visible where RQ keeps failures, not held as running.
    queue = settings.queue
    failed = FailedJobRegistry(queue, connection=redis_conn, serializer=JSONSerializer)
    started = StartedJobRegistry(queue, connection=redis_conn, serializer=JSONSerializer)
    assert long_id in failed.get_job_ids() and started.get_job_ids() == []

    # The worker survived the timeouts: the job queued behind it was explained.
    short = job_status(redis_conn, short_id, store, settings)
    assert short is not None and short["status"] == JobStatus.FINISHED, (short, log[-3000:])
    assert outcomes.get("finished") == 1, outcomes

    # And a person can send the same request again: it is queued afresh, not answered
    # with the old failure.
    again_id, created = find_or_enqueue(
        redis_conn, store, [(f"img{i:02d}", shape_png(i)) for i in range(LONG_IMAGES)],
        tiny_bundle.tag, LONG_METHODS, settings=settings, faithfulness=True,
    )  # fmt: skip
    assert again_id == long_id and created
    again = job_status(redis_conn, long_id, store, settings)
    assert again is not None and again["status"] == JobStatus.QUEUED, again


def test_the_timeout_reason_names_the_limit_and_the_setting_not_an_internal_error(
    redis_server: Any, redis_conn: Any, tiny_bundle: Any, tmp_path: Path, worker_processes: list
) -> None:
    """What lantern.core.jobs._readable_error means to say of a timeout: the limit, the
    setting to raise, and what to do; a timeout is a configured limit, not a bug."""
    store_dir = tmp_path / "artifacts"
    settings = settings_for(
        redis_server.url, store_dir, job_timeout_seconds=TIMEOUT_S, job_retries=0
    )
    store = DirectoryStore(store_dir)
    long_id, _ = _enqueue_long_and_short(redis_conn, store, settings, tiny_bundle)
    log = _run_worker_to_the_end(redis_server, store_dir, tiny_bundle, tmp_path, worker_processes)
    status = job_status(redis_conn, long_id, store, settings)
    assert status is not None and status["status"] == JobStatus.FAILED, (status, log[-3000:])
    error = status["error"]
    assert "internal error" not in error, error
    assert f"longer than {TIMEOUT_S} s" in error and "job_timeout_seconds" in error, error
