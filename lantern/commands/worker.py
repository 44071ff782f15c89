"""lantern worker: run one explanation worker (RQ, PyTorch) that keeps its model loaded."""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys

HELP = "Run an explanation worker: take jobs from Redis, compute maps, store artifacts."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--redis-url", help="Redis to take jobs from; None: the REDIS_URL setting")
    p.add_argument("--queue", help="queue name; None: LANTERN_QUEUE")
    p.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        help="where to compute; None: LANTERN_DEVICE",
    )
    p.add_argument("--model", help="model tag to load at start; None: LANTERN_MODEL")
    p.add_argument("--name", help="worker name; None: random")
    p.add_argument("--burst", action="store_true", help="quit when the queue is empty")
    p.add_argument(
        "--check",
        action="store_true",
        help="health check (a container's): exit 0 when a worker of this host is registered "
        "in Redis, alive, and idle or busy; else say why and exit 1",
    )


def run(args: argparse.Namespace) -> int:
    # Until RQ installs its own handlers (warm shutdown), SIGTERM ends the start-up (loading
    # torch, waiting for Redis) at once. Said explicitly: as a container's PID 1, Python's
    # default would ignore it.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    import redis

    from lantern.core.errors import QueueUnavailable
    from lantern.core.redis_retry import REDIS_ERRORS, retry_redis
    from lantern.core.settings import get_settings
    from workers.worker import ExplainWorker

    overrides = {
        key: value
        for key, value in (
            ("redis_url", args.redis_url),
            ("queue", args.queue),
            ("device", args.device),
            ("model", args.model),
        )
        if value
    }
    settings = get_settings().model_copy(update=overrides)
    if args.check:
        return check_health(settings.redis_url)
    connection = redis.Redis.from_url(settings.redis_url)
    try:
        # A Redis that is restarting is waited for; a wrong password is not.
        retry_redis("reach Redis", connection.ping, settings.redis_retry_seconds)
    except redis.AuthenticationError as e:
        raise QueueUnavailable(
            f"Redis at {_safe_url(settings.redis_url)} refused the password ({e}); check REDIS_URL"
        ) from None
    except redis.RedisError as e:
        raise QueueUnavailable(
            f"cannot reach Redis at {_safe_url(settings.redis_url)} ({e}); start it, or set "
            "REDIS_URL"
        ) from None
    level = "DEBUG" if args.verbose else "INFO"

    def new_worker(name: str | None) -> ExplainWorker:
        return retry_redis(
            "register the worker",
            lambda: ExplainWorker(connection, settings, device=settings.device, name=name),
            settings.redis_retry_seconds,
        )

    worker = new_worker(args.name)
    worker.warm_up()
    while True:
        try:
            worker.work(burst=args.burst, logging_level=level)
        except REDIS_ERRORS as e:
            # RQ's loop ended on a Redis error (Redis gone longer than redis_retry_seconds)
            # and its teardown, which writes the worker's death to Redis, raised again:
            # out of work() rather than logged. Not a reason to exit (jobs are queued).
            print(f"worker loop ended on a Redis error ({e})", file=sys.stderr)
        else:
            if args.burst or _shutdown_was_requested(worker):
                return 0
        # RQ's loop ended on an error (Redis gone longer than redis_retry_seconds, say):
        # wait for Redis and start again rather than exit with jobs still queued.
        print("worker loop ended unexpectedly; waiting for Redis to resume", file=sys.stderr)
        retry_redis("reach Redis", connection.ping, deadline_s=float("inf"))
        worker = new_worker(None)


def _shutdown_was_requested(worker: object) -> bool:
    """Whether RQ's loop ended because it was told to stop (SIGTERM/SIGINT, `rq` commands).

    RQ sets `_stop_requested` only when the signal finds the worker busy; an idle worker
    leaves the loop through StopRequested with only the request's date recorded. Reading
    just the first made an idle worker restart its loop on SIGTERM instead of exiting.
    """
    return bool(
        getattr(worker, "_stop_requested", False)
        or getattr(worker, "_shutdown_requested_date", None) is not None
    )


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


# A worker in one of these states takes jobs; "suspended" (rq suspend) and "dead" do not.
WORKING_STATES = ("idle", "busy", "started")


def check_health(redis_url: str) -> int:
    """Whether this host's worker is connected and working, for a container's HEALTHCHECK.

    Torch-free and quick: it reads RQ's worker registry, finds the workers this host
    registered (a container's hostname is its own), and looks for one whose process is alive
    here and whose state takes jobs. A worker killed without a goodbye stays registered until
    its key expires; the process check catches it at once.
    """
    import socket

    import redis
    from rq.worker import Worker

    host = socket.gethostname()
    try:
        connection = redis.Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=5)
        workers = [w for w in Worker.all(connection=connection) if w.hostname == host]
    except redis.RedisError as e:
        print(f"unhealthy: cannot read the worker registry at {_safe_url(redis_url)}: {e}")
        return 1
    if not workers:
        print(f"unhealthy: no worker of host {host} is registered in Redis")
        return 1
    seen = []
    for worker in workers:
        state = worker.get_state()
        if not _process_alive(worker.pid):
            seen.append(f"{worker.name}: process {worker.pid} is gone")
        elif state not in WORKING_STATES:
            seen.append(f"{worker.name}: {state}")
        else:
            print(f"healthy: worker {worker.name} (pid {worker.pid}) is {state}")
            return 0
    print("unhealthy: " + "; ".join(seen))
    return 1


def _process_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _safe_url(url: str) -> str:
    """The Redis URL without its password, for messages."""
    return re.sub(r"//[^@/]*@", "//***@", url)
