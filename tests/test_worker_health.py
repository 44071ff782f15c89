"""`lantern worker --check`, the worker container's HEALTHCHECK, against a real Redis and a
real worker: healthy while the worker runs; unhealthy, saying why, once it is killed (its
registration lingers in Redis), when Redis cannot be reached, and for another host's worker.
And a worker that is a container's PID 1 stops on SIGTERM (docker stop) instead of waiting to
be killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
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


def _as_pid_1(
    *command: str, env: dict[str, str] | None = None, log: Path | None = None
) -> tuple[subprocess.Popen[bytes], int]:
    """`command` as PID 1 of a new PID namespace, as in a container without an init; returns
    the unshare process and the command's host pid (killed with unshare: --kill-child)."""
    user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    out = log.open("wb") if log else subprocess.DEVNULL
    outer = subprocess.Popen(
        ["unshare", *user, "--pid", "--fork", "--kill-child", "--mount-proc", *command],
        cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
    )  # fmt: skip
    children = Path(f"/proc/{outer.pid}/task/{outer.pid}/children")
    inner = wait_for(lambda: children.read_text().split(), 30, "the namespaced process")
    return outer, int(inner[0])  # type: ignore[index]


def test_a_worker_waiting_for_redis_stops_on_sigterm_even_as_pid_1(
    tmp_path: Path, worker_processes: list
) -> None:
    # Control: a Python process that is PID 1 and installs no handler ignores SIGTERM, which
    # is why `docker stop` of such a container waits out its grace period and kills it.
    control, control_pid = _as_pid_1(sys.executable, "-c", "import time; time.sleep(60)")
    worker_processes.append(control)
    time.sleep(1)
    os.kill(control_pid, signal.SIGTERM)
    with pytest.raises(subprocess.TimeoutExpired):
        control.wait(timeout=3)

    # The worker, still waiting for a Redis that is not there, ends at once with 143.
    env = dict(os.environ, REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    log = tmp_path / "worker.log"
    outer, worker = _as_pid_1(sys.executable, "-m", "lantern.cli", "worker", env=env, log=log)
    worker_processes.append(outer)
    wait_for(lambda: "Redis unreachable" in log.read_text(), 60, "the wait for Redis")
    os.kill(worker, signal.SIGTERM)
    assert outer.wait(timeout=15) == 143, log.read_text()[-2000:]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_an_idle_worker_exits_on_a_stop_signal_instead_of_restarting_its_loop(
    signum: int, redis_server: Any, redis_conn: Any, tiny_bundle: Any, tmp_path: Path,
    worker_processes: list,
) -> None:  # fmt: skip
    env = worker_env(redis_server.url, tmp_path / "artifacts", tiny_bundle.tag)
    log = tmp_path / "worker.log"
    proc = start_worker(env, log)
    worker_processes.append(proc)
    wait_for(lambda: proc.poll() is not None or _registered(redis_conn), 120, "registration")
    wait_for(lambda: "Listening on" in log.read_text(), 60, "the worker to listen")
    proc.send_signal(signum)
    assert proc.wait(timeout=30) == 0, log.read_text()[-2000:]
    assert "loop ended unexpectedly" not in log.read_text()
    assert _registered(redis_conn) == 0  # it said goodbye
