"""Redis writes that outlast a Redis restart: retry with exponential backoff. Torch-free.

Used around every write a busy explanation worker makes (job start, progress, result,
failure, its own state), so a Redis that is killed, restarted or failed over mid-job
costs a pause, not the job and not the worker.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import redis

log = logging.getLogger(__name__)

T = TypeVar("T")

REDIS_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 8.0


def retry_redis(
    what: str, call: Callable[[], T], deadline_s: float, logger: logging.Logger = log
) -> T:
    """`call()`, retried with exponential backoff while Redis is unreachable.

    redis-py reconnects on the next command after a connection error, so retrying the
    call is all a reconnect takes. Raises the last error once `deadline_s` has passed.
    """
    give_up = time.monotonic() + deadline_s
    wait = FIRST_BACKOFF_S
    while True:
        try:
            return call()
        except REDIS_ERRORS as e:
            if time.monotonic() + wait > give_up:
                logger.error(
                    "Redis unreachable for %.0f s, giving up on: %s (%s)", deadline_s, what, e
                )
                raise
            logger.warning("Redis unreachable (%s); will %s again in %.1f s", e, what, wait)
            time.sleep(wait)
            wait = min(wait * 2, MAX_BACKOFF_S)
