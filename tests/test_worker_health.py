"""`lantern worker --check`, the worker container's HEALTHCHECK, against a real Redis and a
real worker: healthy while the worker runs; unhealthy, saying why, once it is killed (its
registration lingers in Redis), when Redis cannot be reached, and for another host's worker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port
from tests.worker_fixtures import REPO, start_worker, wait_for, worker_env

pytestmark = pytest.mark.integration


def _check(redis_url: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, REDIS_URL=redis_url)
    return subprocess.run(
        [sys.executable, "-m", "lantern.cli", "worker", "--check"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _registered(conn: Any) -> int:
    from rq import Worker

    return Worker.count(connection=conn)


def test_the_check_follows_a_real_worker_from_running_to_killed(
    redis_server: Any, redis_conn: Any, tiny_bundle: Any, tmp_path: Path, worker_processes: list
) -> None:
    assert _check(redis_server.url).returncode == 1  # nothing registered yet

    env = worker_env(redis_server.url, tmp_path / "artifacts", tiny_bundle.tag)
    proc = start_worker(env, tmp_path / "worker.log")
    worker_processes.append(proc)
    wait_for(lambda: proc.poll() is not None or _registered(redis_conn), 120, "registration")
    assert proc.poll() is None, (tmp_path / "worker.log").read_text()[-2000:]

    healthy = _check(redis_server.url)
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    assert f"(pid {proc.pid}) is idle" in healthy.stdout

    # SIGKILL: no goodbye, so RQ's registry still lists the worker; the check must not trust it.
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert _registered(redis_conn) == 1
    dead = _check(redis_server.url)
    assert dead.returncode == 1
    assert f"process {proc.pid} is gone" in dead.stdout


def test_another_hosts_worker_does_not_make_this_one_healthy(
    redis_server: Any, redis_conn: Any, tmp_path: Path
) -> None:
    from rq import Queue, Worker

    other = Worker([Queue("elsewhere", connection=redis_conn)], connection=redis_conn)
    other.hostname = "some-other-container"
    other.register_birth()
    assert _registered(redis_conn) == 1
    result = _check(redis_server.url)
    assert result.returncode == 1
    assert "no worker of host" in result.stdout


def test_unreachable_redis_is_unhealthy_with_the_reason_and_no_password() -> None:
    url = f"redis://:s3cret@127.0.0.1:{free_port()}/0"
    result = _check(url)
    assert result.returncode == 1
    assert "cannot read the worker registry" in result.stdout
    assert "s3cret" not in result.stdout + result.stderr
