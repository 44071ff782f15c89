"""Keeping the serving process's memory flat under sustained load (BENCHMARKS.md, "Memory").

Two things made the RSS of the model worker grow with every request:

1. **BentoML's TimeoutMiddleware never cancels its timer.** For every HTTP request it calls
   `loop.call_later(timeout, ...)` and forgets the handle, so each request's waiter future
   and its whole `contextvars` context (the OpenTelemetry server span BentoML always
   records, its attributes, BentoML's request-id and timing variables) stay reachable from
   the event loop's timer heap for the service's `traffic.timeout` (300 s here) after the
   response went out: ~6 KB of Python heap per request, so memory grows with the request
   rate until the first timers fire. `patch_timeout_middleware()` replaces its `__call__`
   with the same logic plus `handle.cancel()` once the request is done, and asyncio then
   drops cancelled timers from its heap.
2. **glibc malloc arenas.** Uploads are decoded in anyio's worker threads (up to 40) and
   ONNX Runtime runs in its own; glibc gives busy threads their own arenas (up to 8 per
   core) and keeps freed memory in each; and once a large block (a decoded photo, an
   activation) has been freed, its adaptive mmap threshold rises so later large blocks
   come from the heap and fragment it. `lantern serve` sets `MALLOC_ARENA_MAX=2` and
   `MALLOC_MMAP_THRESHOLD_=1 MiB` (`lantern.commands.serve.MALLOC_ENV`); decoding runs
   in at most `decode_threads()` threads at once (more than the cores only hold more
   decoded images in memory); `MallocTrimmer` hands freed heap pages back every couple
   of seconds; and ONNX Runtime runs without its CPU arena (service/classifier.py),
   which only ever grows to the largest batch seen.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import threading
import time
from typing import Any

log = logging.getLogger("lantern.service.memory")

_PATCHED = "_lantern_cancels_timer"


def patch_timeout_middleware() -> bool:
    """Make BentoML's TimeoutMiddleware cancel its timer when the request is done.

    Idempotent; returns False (and changes nothing) if BentoML's middleware is not where
    this BentoML version is known to keep it.
    """
    try:
        from bentoml._internal.server.http import traffic
    except ImportError:  # pragma: no cover - a BentoML without it
        log.warning("bentoml's TimeoutMiddleware not found; its timers are not cancelled")
        return False
    middleware = traffic.TimeoutMiddleware
    if getattr(middleware.__call__, _PATCHED, False):
        return True

    async def __call__(self: Any, scope: Any, receive: Any, send: Any) -> None:
        # BentoML 1.4's TimeoutMiddleware.__call__, plus the `timer.cancel()` at the end.
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        timer = loop.call_later(self.timeout, self._set_timer_out, waiter)

        async def _send(message: Any) -> None:
            if not waiter.done():
                waiter.set_result(None)
            await send(message)

        fut = asyncio.ensure_future(self.app(scope, receive, _send), loop=loop)
        try:
            try:
                await waiter
            except TimeoutError:
                if fut.cancel():
                    from starlette.responses import JSONResponse

                    resp = JSONResponse(
                        {"error": f"Not able to process the request in {self.timeout} seconds"},
                        status_code=504,
                    )
                    await resp(scope, receive, send)
            else:
                await fut  # wait for the future to finish
        finally:
            timer.cancel()

    setattr(__call__, _PATCHED, True)
    middleware.__call__ = __call__  # type: ignore[method-assign]
    return True


def decode_threads() -> int:
    """Worker threads that may decode uploads at once: two per usable CPU."""
    from lantern.core.cpus import usable_cpus

    return 2 * usable_cpus()


class MallocTrimmer:
    """Hands memory that glibc keeps free inside its arenas back to the OS, now and then.

    `maybe_trim()` is cheap to call often (after every model call): it runs
    `malloc_trim(0)` at most once per `interval_s`. A no-op where libc has no malloc_trim
    (musl, macOS).
    """

    def __init__(self, interval_s: float = 2.0) -> None:
        self.interval_s = interval_s
        self._last = time.monotonic()
        self._lock = threading.Lock()
        self._trim: Any = None
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            self._trim = libc.malloc_trim
            self._trim.argtypes = [ctypes.c_size_t]
            self._trim.restype = ctypes.c_int
        except (OSError, AttributeError):
            log.info("malloc_trim is not available here; freed heap memory stays mapped")

    def maybe_trim(self) -> bool:
        """Trim if the interval has passed since the last trim; True if it trimmed."""
        if self._trim is None:
            return False
        now = time.monotonic()
        if now - self._last < self.interval_s or not self._lock.acquire(blocking=False):
            return False
        try:
            self._last = now
            self._trim(0)
            return True
        finally:
            self._lock.release()
