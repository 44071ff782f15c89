"""workers/worker.py: "SIGTERM or Ctrl+C: finish the current job, then stop (a second one
stops at once; the job is then failed and retried)". The first half is proved by
tests/test_up.py (Ctrl-C mid-job); this is the second, with a real redis-server and real
`lantern worker` processes: two SIGTERMs mid-job, the second more than a second after
the first (RQ ignores a repeat within a second), stop the worker within seconds, long
before the job could have finished, and a second worker finishes the job on a retry."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import pytest

from lantern.core.jobs import JobStatus, find_or_enqueue, job_status
from lantern.core.store import DirectoryStore
from tests.worker_fixtures import (
    job_outcomes,
    settings_for,
    shape_png,
    start_worker,
    wait_for,
    worker_env,
)

pytestmark = pytest.mark.integration

IMAGES = 64  # the most a job may carry: long enough on any CPU


def test_a_second_sigterm_stops_a_busy_worker_at_once_and_its_job_is_retried(
    redis_server: Any, redis_conn: Any, tiny_bundle: Any, tmp_path: Path, worker_processes: list
) -> None:

    store_dir = tmp_path / "artifacts"
    settings = settings_for(redis_server.url, store_dir, job_retries=2)
    store = DirectoryStore(store_dir)
    images = [(f"img{i:02d}", shape_png(i)) for i in range(IMAGES)]
    job_id, _ = find_or_enqueue(
        redis_conn, store, images, tiny_bundle.tag, ["gradcam", "saliency"], settings=settings,
        faithfulness=True,
    )  # fmt: skip
    # One image per pass: the job takes a while, and reports progress as it goes.
    env = worker_env(redis_server.url, store_dir, tiny_bundle.tag, LANTERN_EXPLAIN_CHUNK_SIZE="1")
    log_path = tmp_path / "first.log"
    first = start_worker(env, log_path)
    worker_processes.append(first)

    def progressed() -> bool:
        status = job_status(redis_conn, job_id, store, settings)
        return status is not None and status["progress"]["done"] >= 1

    wait_for(progressed, 120, "the job to get going", poll=0.05)
    first.send_signal(signal.SIGTERM)
    time.sleep(1.5)  # RQ ignores a repeat within a second (a pool and a terminal both signal)
    first.send_signal(signal.SIGTERM)
    first.wait(timeout=20)
    status = job_status(redis_conn, job_id, store, settings)
    assert status is not None and status["status"] != JobStatus.FINISHED, (
        "the job finished: the second SIGTERM did not stop it",
        log_path.read_text(errors="replace")[-3000:],
    )
    assert status["progress"]["done"] < IMAGES

    second = start_worker(
        worker_env(redis_server.url, store_dir, tiny_bundle.tag), tmp_path / "second.log", "--burst"
    )
    worker_processes.append(second)

    def ended() -> bool:
        current = job_status(redis_conn, job_id, store, settings)
        return current is not None and current["status"] in (JobStatus.FINISHED, JobStatus.FAILED)

    wait_for(ended, 240, "the job to end on the second worker", poll=0.5)
    final = job_status(redis_conn, job_id, store, settings)
    assert final is not None and final["status"] == JobStatus.FINISHED, final
    assert len(final["manifest"]["images"]) == IMAGES
    assert redis_conn.hget(f"rq:job:{job_id}", "retries_left") == b"1"  # one retry spent
    outcomes = job_outcomes(redis_conn)
    assert outcomes == {"retried": 1, "finished": 1}, outcomes
