"""A Redis outage longer than LANTERN_REDIS_RETRY_SECONDS, mid-job: nothing is lost.

The README and workers.worker promise that a busy worker retries its Redis writes for up to
`redis_retry_seconds`, and that if Redis stays away longer "the job's lease lapses and,
once Redis is back, maintenance retries or fails it with a reason: nothing is left
'started'". tests/test_redis_outage.py proves the short outage (every job finishes
through the retries); this proves the long one, with real processes: a persistent
password-protected redis-server, one `lantern worker` with a 2 s retry window, and a
32-image job explained an image at a time (two methods and faithfulness curves), so it
writes its progress, and finds Redis gone, within an image of the kill. Once the job says
started, Redis is SIGKILLed and left down until the worker has given up on a write, and
for at least 12 s, six times the window; then it is started again on the same port and
data. The job must end finished, by maintenance's
retry (one retry counted, one spent), the same worker process must have done all of it
and still take new work, and nothing may be left in StartedJobRegistry.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_py

from lantern.core.jobs import JobStatus, find_or_enqueue, job_status
from lantern.core.store import DirectoryStore
from tests.conftest import PersistentRedis
from tests.worker_fixtures import (
    job_outcomes,
    settings_for,
    shape_png,
    start_worker,
    wait_for,
    worker_env,
)

pytestmark = pytest.mark.integration

PASSWORD = "long-outage-password"
RETRY_WINDOW_S = 2
OUTAGE_S = 12.0
IMAGES = 32
METHODS = ["gradcam", "saliency"]


@pytest.fixture
def redis_instance(tmp_path: Path) -> Iterator[PersistentRedis]:
    instance = PersistentRedis(tmp_path / "redis", PASSWORD, appendfsync="always")
    instance.start()
    yield instance
    instance.kill()


def test_a_job_whose_redis_stays_away_past_the_retry_window_is_retried_by_maintenance_and_finishes(
    redis_instance: PersistentRedis, tiny_bundle: Any, tmp_path: Path, worker_processes: list
) -> None:
    from rq.registry import StartedJobRegistry
    from rq.serializers import JSONSerializer

    store_dir = tmp_path / "artifacts"
    settings = settings_for(
        redis_instance.url, store_dir, redis_retry_seconds=RETRY_WINDOW_S, job_retries=2
    )
    store = DirectoryStore(store_dir)
    connection = redis_py.Redis.from_url(redis_instance.url)
    images = [(f"img{i:02d}", shape_png(i)) for i in range(IMAGES)]
    job_id, created = find_or_enqueue(
        connection, store, images, tiny_bundle.tag, METHODS, settings=settings, faithfulness=True
    )
    assert created

    env = worker_env(
        redis_instance.url, store_dir, tiny_bundle.tag,
        LANTERN_REDIS_RETRY_SECONDS=str(RETRY_WINDOW_S), LANTERN_EXPLAIN_CHUNK_SIZE="1",
    )  # fmt: skip
    log_path = tmp_path / "worker.log"
    worker = start_worker(env, log_path)
    worker_processes.append(worker)

    def status() -> dict[str, Any]:
        current = job_status(connection, job_id, store, settings)
        assert current is not None, "the job vanished"
        return current

    wait_for(lambda: status()["status"] == JobStatus.STARTED, 180, "the job to start", poll=0.05)
    redis_instance.kill()
    killed_at = time.monotonic()
    connection.close()

    # Past the retry window the worker gives up on its writes (and says so), and waits.
    wait_for(
        lambda: "giving up on" in log_path.read_text(errors="replace"),
        120, "the worker to give up on a Redis write",
    )  # fmt: skip
    assert worker.poll() is None, log_path.read_text(errors="replace")[-3000:]
    time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - killed_at)))
    redis_instance.start()

    def ended() -> bool:
        return status()["status"] in (JobStatus.FINISHED, JobStatus.FAILED)

    wait_for(ended, 300, "the job to end after Redis came back", poll=0.5)
    log = log_path.read_text(errors="replace")
    final = status()
    assert final["status"] == JobStatus.FINISHED, (final, log[-3000:])
    manifest = final["manifest"]
    assert manifest is not None and len(manifest["images"]) == IMAGES
    assert all(set(METHODS) <= set(image["files"]) for image in manifest["images"])
    heatmaps = [f for f in store.list_files(job_id) if f.endswith(".heatmap.png")]
    assert len(heatmaps) == IMAGES * len(METHODS), len(heatmaps)
    # It finished by maintenance's retry, not by the write that was given up on.
    outcomes = job_outcomes(connection)
    assert outcomes.get("retried") == 1 and outcomes.get("finished") == 1, (outcomes, log[-3000:])
    assert connection.hget(f"rq:job:{job_id}", "retries_left") == b"1"
    started = StartedJobRegistry(settings.queue, connection=connection, serializer=JSONSerializer)
    assert started.get_job_ids() == []

    # The same worker process did all of it, and still takes new work.
    assert worker.poll() is None, log[-3000:]
    next_id, created = find_or_enqueue(
        connection, store, [("after", shape_png(3))], tiny_bundle.tag, ["activations"],
        settings=settings,
    )  # fmt: skip
    assert created
    wait_for(
        lambda: (s := job_status(connection, next_id, store, settings)) is not None
        and s["status"] == JobStatus.FINISHED,
        120, "a job submitted after the outage to finish",
    )  # fmt: skip
    assert worker.poll() is None
