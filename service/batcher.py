"""Micro-batching: concurrent requests share one model call, without waiting to fill it.

Consumer tasks own the model, one per model stream. Whenever a stream is free it takes
what is queued (whole requests only, up to `max_batch_size` images, and no more than its
share when other streams are free too) and runs it in a worker thread. There is no
waiting heuristic: a lone request runs at once, and under load the next batch collects by
itself while the current ones run. A request that sits in the queue longer than
`max_queue_wait_s` is refused with `Overloaded` (the API answers 503), so an overloaded
service sheds load instead of piling up work nobody waits for.

Several streams (`streams` > 1) run several batches at once, each on one thread of its
own (`run`: a single-threaded session). On a CPU shared with HTTP handling and image
decoding this wastes less than one batch spread over every core: when the decoder
preempts one thread of a multi-threaded model call, the call's other threads wait for it
at the next barrier, while a single-threaded stream only pauses itself (BENCHMARKS.md,
"Streams"). A batch taken when no other batch runs and nothing else is queued (a lone
request at low load) runs on `run_alone` instead, the all-cores session, so its latency
is that of the whole machine; the other streams wait until it is done.

Model calls run on threads of their own (a CapacityLimiter of `streams` tokens), not on
anyio's shared pool: that pool also runs the explanation side's Redis calls, and with a
hung Redis (a network partition: no refusal, only timeouts) dozens of /jobs polls held
every token and a prediction waited seconds for a thread.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio
import numpy as np

log = logging.getLogger("lantern.service.batcher")

RunBatch = Callable[[np.ndarray], np.ndarray]
"""The model: outputs (N, ...) for inputs (N, ...), row i answering input i. Outputs must
not be views of the inputs, which the batcher reuses for the next batch."""

ObserveBatch = Callable[[int, list[float]], None]
"""Called once per batch with its image count and each request's queue wait in seconds."""


class Overloaded(Exception):
    """The request could not be started in time (or the service is shutting down)."""


@dataclass(eq=False)
class _Request:
    inputs: np.ndarray
    future: asyncio.Future[np.ndarray]
    enqueued: float
    expiry: asyncio.TimerHandle | None = field(default=None, repr=False)

    @property
    def size(self) -> int:
        return int(self.inputs.shape[0])


class MicroBatcher:
    """Feeds `run` with batches of the requests queued while it was busy."""

    def __init__(
        self,
        run: RunBatch,
        *,
        max_batch_size: int,
        max_queue_wait_s: float,
        observe: ObserveBatch | None = None,
        streams: int = 1,
        run_alone: RunBatch | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queue_wait_s <= 0 or streams < 1:
            raise ValueError("max_batch_size and streams must be >= 1, and max_queue_wait_s > 0")
        self.run = run
        self.run_alone = run_alone
        self.streams = streams
        self.max_batch_size = max_batch_size
        self.max_queue_wait_s = max_queue_wait_s
        self.observe = observe
        self._queue: deque[_Request] = deque()
        self._queued = asyncio.Event()
        self._consumers: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._running = 0  # batches in flight
        self._threads: anyio.CapacityLimiter | None = None  # model calls' own threads
        self._alone: asyncio.Event | None = None  # set when the lone batch is done

    async def submit(self, inputs: np.ndarray) -> np.ndarray:
        """The model's outputs for `inputs` (N, ...); more than a batch is split up.

        Raises Overloaded when the request waited too long to start, and whatever the
        model raised when the batch it ran in failed.
        """
        if inputs.shape[0] > self.max_batch_size:
            chunks = [
                inputs[i : i + self.max_batch_size]
                for i in range(0, inputs.shape[0], self.max_batch_size)
            ]
            return np.concatenate(await asyncio.gather(*(self.submit(c) for c in chunks)))
        if self._closed:
            raise Overloaded("the service is shutting down")
        loop = self._start_consumer()
        request = _Request(inputs, loop.create_future(), loop.time())
        request.expiry = loop.call_later(self.max_queue_wait_s, self._expire, request)
        self._queue.append(request)
        self._queued.set()
        try:
            return await request.future
        finally:
            # Normally already gone; still queued when this caller was cancelled (the
            # client went away), so the model does not work for nobody.
            self._drop(request)

    async def aclose(self) -> None:
        """Refuse new requests, fail the queued ones, and let the running batch finish."""
        self._closed = True
        while self._queue:
            request = self._queue.popleft()
            self._settle(request, error=Overloaded("the service is shutting down"))
        self._queued.set()  # wakes idle consumers, which then see it is closed
        if self._consumers:
            await asyncio.wait(self._consumers)
            self._consumers = []

    def _start_consumer(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if not self._consumers or self._consumers[0].done() or self._loop is not loop:
            # A new event loop (e.g. a second test client) needs its own consumers and event.
            self._loop = loop
            self._queued = asyncio.Event()
            if self._queue:
                self._queued.set()
            self._running, self._alone = 0, None
            self._threads = anyio.CapacityLimiter(self.streams)
            self._consumers = [
                loop.create_task(self._consume(), name=f"lantern-batcher-{i}")
                for i in range(self.streams)
            ]
        return loop

    async def _consume(self) -> None:
        buffer = _BatchBuffer(self.max_batch_size)  # this stream's, one batch at a time
        while not self._closed:
            await self._queued.wait()
            if self._alone is not None:  # a lone batch has every core: wait for it
                await self._alone.wait()
                continue
            batch = self._take(share=self._share())
            if not batch:
                continue
            alone = self.run_alone is not None and self._running == 0 and not self._queue
            if alone:
                self._alone = asyncio.Event()
            self._running += 1
            try:
                run = self.run_alone if alone and self.run_alone else self.run
                await self._run(batch, run, buffer)
            finally:
                self._running -= 1
                if alone and self._alone is not None:
                    self._alone.set()
                    self._alone = None

    def _share(self) -> int:
        """Images this stream may take: the queue split evenly over the free streams."""
        free = max(1, self.streams - self._running)
        queued = sum(r.size for r in self._queue)
        return min(self.max_batch_size, max(1, -(-queued // free)))

    def _take(self, share: int | None = None) -> list[_Request]:
        """The queued requests, oldest first, that fit in `share` images (default: one
        batch); at least one."""
        limit = self.max_batch_size if share is None else share
        batch: list[_Request] = []
        images = 0
        while self._queue and (not batch or images + self._queue[0].size <= limit):
            request = self._queue.popleft()
            if request.expiry is not None:
                request.expiry.cancel()
            batch.append(request)
            images += request.size
        if not self._queue:
            self._queued.clear()
        return batch

    async def _run(self, batch: list[_Request], run: RunBatch, buffer: _BatchBuffer) -> None:
        inputs = [r.inputs for r in batch]
        if self.observe is not None:
            now = asyncio.get_running_loop().time()
            try:
                self.observe(sum(r.size for r in batch), [now - r.enqueued for r in batch])
            except Exception:  # metrics must never stop the model
                log.exception("recording batch metrics failed")
        try:
            outputs = await anyio.to_thread.run_sync(
                self._run_concatenated, run, inputs, buffer, limiter=self._threads
            )
        except Exception as e:  # the model failed: every request of this batch hears it
            log.error("a batch of %d request(s) failed: %r", len(batch), e)
            for request in batch:
                self._settle(request, error=e)
            return
        offsets = np.cumsum([r.size for r in batch])[:-1]
        for request, rows in zip(batch, np.split(outputs, offsets), strict=True):
            self._settle(request, result=rows)

    @staticmethod
    def _run_concatenated(
        run: RunBatch, inputs: list[np.ndarray], buffer: _BatchBuffer
    ) -> np.ndarray:
        batch = inputs[0] if len(inputs) == 1 else buffer.concatenate(inputs)
        outputs = run(batch)
        if outputs.shape[0] != batch.shape[0]:
            raise RuntimeError(f"the model answered {outputs.shape[0]} rows for {batch.shape[0]}")
        return outputs

    def _expire(self, request: _Request) -> None:
        if request in self._queue:
            self._queue.remove(request)
            waited = self.max_queue_wait_s * 1000
            self._settle(request, error=Overloaded(f"not started within {waited:.0f} ms"))

    def _drop(self, request: _Request) -> None:
        if request.expiry is not None:
            request.expiry.cancel()
        if request in self._queue:
            self._queue.remove(request)

    @staticmethod
    def _settle(
        request: _Request, *, result: np.ndarray | None = None, error: BaseException | None = None
    ) -> None:
        if request.expiry is not None:
            request.expiry.cancel()
        if request.future.done():  # the caller gave up (cancelled) meanwhile
            return
        if error is not None:
            request.future.set_exception(error)
        elif result is not None:
            request.future.set_result(result)


class _BatchBuffer:
    """One stream's batch input, reused from batch to batch.

    Concatenating the requests into a new array would allocate a batch of 1 MiB or more
    per run (600 KB per 224 px image), which under `lantern serve`'s fixed mmap threshold
    is a fresh mapping every time: 147 page faults per image, filled and zeroed by the
    kernel, 0.5 ms of CPU per image against 0.02 ms for copying into memory already
    mapped (BENCHMARKS.md, "Page faults outside the model"). The buffer holds
    `max_batch_size` images but is never written beyond the largest batch, so only that
    much of it is resident.
    """

    def __init__(self, max_batch_size: int) -> None:
        self.max_batch_size = max_batch_size
        self._array: np.ndarray | None = None

    def concatenate(self, inputs: list[np.ndarray]) -> np.ndarray:
        """The inputs, stacked along axis 0, in this buffer (a view valid until the next call)."""
        first = inputs[0]
        rows = sum(x.shape[0] for x in inputs)
        if (
            self._array is None
            or self._array.shape[1:] != first.shape[1:]
            or self._array.dtype != first.dtype
            or rows > self._array.shape[0]
        ):
            # A new shape or dtype (a different model's inputs) or an oversized call: a
            # fresh array, kept for the next batch.
            shape = (max(rows, self.max_batch_size), *first.shape[1:])
            self._array = np.empty(shape, dtype=first.dtype)
        return np.concatenate(inputs, out=self._array[:rows])
