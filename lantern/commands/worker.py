"""lantern worker: run one explanation worker (RQ, PyTorch) that keeps its model loaded."""

from __future__ import annotations

import argparse
import re
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


def run(args: argparse.Namespace) -> int:
    import redis

    from lantern.core.errors import QueueUnavailable
    from lantern.core.redis_retry import retry_redis
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
        worker.work(burst=args.burst, logging_level=level)
        if args.burst or worker._stop_requested:
            return 0
        # RQ's loop ended on an error (Redis gone longer than redis_retry_seconds, say):
        # wait for Redis and start again rather than exit with jobs still queued.
        print("worker loop ended unexpectedly; waiting for Redis to resume", file=sys.stderr)
        retry_redis("reach Redis", connection.ping, deadline_s=float("inf"))
        worker = new_worker(None)


def _safe_url(url: str) -> str:
    """The Redis URL without its password, for messages."""
    return re.sub(r"//[^@/]*@", "//***@", url)
