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
   of seconds.

ONNX Runtime's activations do not go through malloc per run: with the fixed mmap
threshold, every tensor of 1 MiB or more would be a fresh mapping, page-faulted in and
zeroed by the kernel on every run (1,100-2,000 faults per INT8 ResNet-50 image, 4-9 ms
of system CPU; 10-15 % of the model's throughput, BENCHMARKS.md "ONNX Runtime's memory
arena"). ONNX Runtime keeps its CPU arena, which reuses the same memory run after run,
and `ArenaShrinker` asks it every couple of seconds to hand back the regions no run is
using, so the arena does not stay at the size of the biggest batch it ever saw.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import threading
import time
from collections.abc import Callable
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


class AtMostEvery:
    """`due()` is True at most once per `interval_s` (the interval starts at creation),
    and to one caller at a time when threads ask together."""

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self._clock = clock
        self._last = clock()
        self._lock = threading.Lock()

    def due(self) -> bool:
        if self._clock() - self._last < self.interval_s:
            return False  # the common case, without the lock
        with self._lock:
            now = self._clock()
            if now - self._last < self.interval_s:
                return False  # another thread took this interval
            self._last = now
            return True


class MallocTrimmer:
    """Hands memory that glibc keeps free inside its arenas back to the OS, now and then.

    `maybe_trim()` is cheap to call often (after every model call): it runs
    `malloc_trim(0)` at most once per `interval_s`. A no-op where libc has no malloc_trim
    (musl, macOS).
    """

    def __init__(self, interval_s: float = 2.0) -> None:
        self.every = AtMostEvery(interval_s)
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
        if self._trim is None or not self.every.due():
            return False
        self._trim(0)
        return True


# ONNX Runtime's RunOptions key: at the end of the run, free the arena's regions of the
# listed devices that no run is using (onnxruntime_run_options_config_keys.h).
ARENA_SHRINKAGE = "memory.enable_memory_arena_shrinkage"


class ArenaShrinker:
    """ONNX Runtime run options that shrink a session's CPU arena, at most once per
    `interval_s`: `run_options()` before each run, passed to `session.run`.

    Shrinking every run would hand the memory back only to page-fault it in again on the
    next run, which is what the arena is there to avoid; never shrinking would keep the
    activations of the biggest batches ever run for the life of the process. One shrinker
    per session (each has its own arena). The session must have its CPU arena enabled
    (service.classifier.session_options): ONNX Runtime refuses the run otherwise.
    """

    def __init__(
        self, interval_s: float = 2.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        import onnxruntime as ort

        self.every = AtMostEvery(interval_s, clock)
        self._shrink = ort.RunOptions()
        self._shrink.add_run_config_entry(ARENA_SHRINKAGE, "cpu:0")

    def run_options(self) -> Any:
        """The shrinking RunOptions when the interval has passed, else None (the default)."""
        return self._shrink if self.every.due() else None
