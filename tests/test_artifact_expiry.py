"""A running worker deletes artifact directories older than LANTERN_JOB_TTL_SECONDS.

Real processes: a redis-server and a `lantern worker`, whose maintenance (every
LANTERN_WORKER_MAINTENANCE_SECONDS, 2 s here) expires the artifact store."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from tests.worker_fixtures import start_worker, wait_for, worker_env

TTL_S = 600


def job_dir(root: Path, job_id: str, age_s: float) -> Path:
    """An artifact directory with one file, last written `age_s` ago."""
    path = root / job_id
    path.mkdir(parents=True)
    (path / "manifest.json").write_text("{}")
    then = time.time() - age_s
    os.utime(path, (then, then))
    return path


def test_a_running_worker_deletes_only_the_artifacts_past_their_ttl(
    redis_server: Any, tiny_bundle: Any, tmp_path: Path, worker_processes: list
) -> None:
    artifacts = tmp_path / "artifacts"
    expired = job_dir(artifacts, "ex-" + "a" * 32, age_s=TTL_S + 60)
    recent = job_dir(artifacts, "ex-" + "b" * 32, age_s=TTL_S - 60)
    env = worker_env(
        redis_server.url, artifacts, tiny_bundle.tag, LANTERN_JOB_TTL_SECONDS=str(TTL_S)
    )
    log = tmp_path / "worker.log"
    worker = start_worker(env, log)
    worker_processes.append(worker)
    # Written while the worker runs: its periodic maintenance, not only a pass at start.
    wait_for(lambda: not expired.exists(), 60, "the first expired directory to go", poll=0.2)
    later = job_dir(artifacts, "ex-" + "c" * 32, age_s=TTL_S + 60)
    wait_for(lambda: not later.exists(), 30, "a directory expired later to go", poll=0.2)
    assert worker.poll() is None, log.read_text(errors="replace")[-2000:]
    assert recent.is_dir() and (recent / "manifest.json").read_text() == "{}"
    assert "expired artifacts of 1 job(s)" in log.read_text(errors="replace")
