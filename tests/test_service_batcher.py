"""The micro-batcher alone: batching without waiting, routing, errors, overload, shutdown."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from service.batcher import MicroBatcher, Overloaded


class Model:
    """Doubles its input; records each batch; can be held busy or made to fail."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.batches: list[list[float]] = []
        self.fail_on: float | None = None
        self.release = threading.Event()
        self.release.set()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.release.wait(5)
        time.sleep(self.delay_s)
        self.batches.append([float(v) for v in batch[:, 0]])
        if self.fail_on is not None and self.fail_on in batch[:, 0]:
            raise ValueError("model failed")
        return batch * 2


def rows(*values: float) -> np.ndarray:
    return np.array([[v] for v in values], dtype=np.float32)


def batcher(model: Model, max_queue_wait_s: float = 5.0) -> MicroBatcher:
    return MicroBatcher(model, max_batch_size=4, max_queue_wait_s=max_queue_wait_s)


def test_a_lone_request_runs_at_once() -> None:
    model = Model()

    async def main() -> float:
        b = batcher(model)
        t0 = time.perf_counter()
        out = await b.submit(rows(3))
        assert out.tolist() == [[6.0]]
        await b.aclose()
        return time.perf_counter() - t0

    assert asyncio.run(main()) < 0.1
    assert model.batches == [[3.0]]


def test_requests_queued_while_the_model_is_busy_form_one_batch_in_order() -> None:
    model = Model()
    sizes: list[int] = []

    async def main() -> list[np.ndarray]:
        b = MicroBatcher(
            model, max_batch_size=8, max_queue_wait_s=5, observe=lambda n, _: sizes.append(n)
        )
        model.release.clear()
        first = asyncio.ensure_future(b.submit(rows(0)))
        await asyncio.sleep(0.05)  # the first batch is running (held)
        rest = [asyncio.ensure_future(b.submit(rows(i, i + 0.5))) for i in (1, 2, 3)]
        await asyncio.sleep(0.05)
        model.release.set()
        out = await asyncio.gather(first, *rest)
        await b.aclose()
        return out

    out = asyncio.run(main())
    assert model.batches == [[0.0], [1.0, 1.5, 2.0, 2.5, 3.0, 3.5]]
    assert sizes == [1, 6]
    for i, o in zip((1, 2, 3), out[1:], strict=True):
        assert o.tolist() == [[2 * i], [2 * i + 1]]  # each caller gets its own rows


def test_batches_respect_the_size_limit_and_big_requests_are_split() -> None:
    model = Model()

    async def main() -> np.ndarray:
        b = batcher(model)
        out = await b.submit(rows(*range(10)))
        await b.aclose()
        return out

    assert asyncio.run(main())[:, 0].tolist() == [2.0 * i for i in range(10)]
    assert all(len(batch) <= 4 for batch in model.batches)
    assert sorted(v for batch in model.batches for v in batch) == list(range(10))


def test_batches_of_several_requests_reuse_one_input_buffer_per_stream() -> None:
    # A fresh concatenated batch per run is a fresh mapping of 1 MiB or more under the
    # server's malloc settings, page-faulted in on every run (service.batcher._BatchBuffer).
    model = Model()
    addresses: list[int] = []
    kept: list[np.ndarray] = []  # alive, so a fresh batch could not reuse a freed one's memory

    def run(batch: np.ndarray) -> np.ndarray:
        addresses.append(batch.__array_interface__["data"][0])
        kept.append(batch)
        return model(batch)

    async def main() -> list[list[np.ndarray]]:
        b = MicroBatcher(run, max_batch_size=8, max_queue_wait_s=5)
        answers = []
        for round_ in range(4):
            model.release.clear()
            first = asyncio.ensure_future(b.submit(rows(-1)))  # runs alone, holds the model
            await asyncio.sleep(0.05)
            sizes = [1 + (round_ + i) % 3 for i in range(3)]  # 3 requests, 3 to 6 rows
            rest = [
                asyncio.ensure_future(b.submit(rows(*[10 * round_ + i] * n)))
                for i, n in enumerate(sizes)
            ]
            await asyncio.sleep(0.05)
            model.release.set()
            await first
            answers.append(await asyncio.gather(*rest))
        await b.aclose()
        return answers

    answers = asyncio.run(main())
    for round_, out in enumerate(answers):
        for i, rows_out in enumerate(out):  # each caller's own rows, not a later batch's
            assert rows_out[:, 0].tolist() == [2.0 * (10 * round_ + i)] * len(rows_out)
    assert [len(batch) for batch in model.batches[1::2]] == [6, 6, 6, 6]
    shared = addresses[1::2]  # the batches of three requests
    assert len(set(shared)) == 1, shared


def test_a_failed_batch_fails_its_requests_only_and_the_batcher_keeps_going() -> None:
    model = Model()
    model.fail_on = 7.0

    async def main() -> None:
        b = batcher(model)
        model.release.clear()
        held = asyncio.ensure_future(b.submit(rows(1)))
        await asyncio.sleep(0.05)
        doomed = [asyncio.ensure_future(b.submit(rows(v))) for v in (7, 8)]
        await asyncio.sleep(0.05)
        model.release.set()
        assert (await held).tolist() == [[2.0]]
        for d in doomed:
            with pytest.raises(ValueError, match="model failed"):
                await d
        assert (await b.submit(rows(9))).tolist() == [[18.0]]
        await b.aclose()

    asyncio.run(main())


def test_a_request_not_started_in_time_is_refused_as_overloaded() -> None:
    model = Model()

    async def main() -> None:
        b = batcher(model, max_queue_wait_s=0.1)
        model.release.clear()
        busy = asyncio.ensure_future(b.submit(rows(1)))
        await asyncio.sleep(0.02)
        with pytest.raises(Overloaded, match="100 ms"):
            await b.submit(rows(2))
        model.release.set()
        assert (await busy).tolist() == [[2.0]]
        await b.aclose()

    asyncio.run(main())
    assert model.batches == [[1.0]]  # the refused request never reached the model


def test_a_cancelled_request_leaves_the_queue() -> None:
    model = Model()

    async def main() -> None:
        b = batcher(model)
        model.release.clear()
        busy = asyncio.ensure_future(b.submit(rows(1)))
        await asyncio.sleep(0.02)
        gone = asyncio.ensure_future(b.submit(rows(2)))
        await asyncio.sleep(0.02)
        gone.cancel()
        model.release.set()
        await busy
        assert (await b.submit(rows(3))).tolist() == [[6.0]]
        await b.aclose()

    asyncio.run(main())
    assert model.batches == [[1.0], [3.0]]


def test_shutdown_fails_queued_requests_and_refuses_new_ones() -> None:
    model = Model()

    async def main() -> None:
        b = batcher(model)
        model.release.clear()
        running = asyncio.ensure_future(b.submit(rows(1)))
        await asyncio.sleep(0.02)
        queued = asyncio.ensure_future(b.submit(rows(2)))
        await asyncio.sleep(0.02)
        closing = asyncio.ensure_future(b.aclose())
        await asyncio.sleep(0.02)
        model.release.set()
        await closing
        assert (await running).tolist() == [[2.0]]  # the running batch finished
        with pytest.raises(Overloaded, match="shutting down"):
            await queued
        with pytest.raises(Overloaded, match="shutting down"):
            await b.submit(rows(3))

    asyncio.run(main())


# --- model streams: several batches at once, a lone request on every core ----------------


class BarrierModel(Model):
    """A single-threaded stream: its calls wait for `parties` calls to be running at once,
    so a test fails (BrokenBarrierError) unless the batcher really overlaps them."""

    def __init__(self, parties: int) -> None:
        super().__init__()
        self.barrier = threading.Barrier(parties, timeout=5)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.barrier.wait()
        return super().__call__(batch)


def streams(model: Model, alone: Model, n: int = 2) -> MicroBatcher:
    return MicroBatcher(model, max_batch_size=8, max_queue_wait_s=5, streams=n, run_alone=alone)


def test_two_streams_run_two_batches_at_once_splitting_the_queue_between_them() -> None:
    stream, alone = BarrierModel(parties=2), Model()

    async def main() -> list[np.ndarray]:
        b = streams(stream, alone)
        # Queued together while both streams are free: each stream takes half.
        out = await asyncio.gather(b.submit(rows(1)), b.submit(rows(2)))
        await b.aclose()
        return out

    out = asyncio.run(main())
    assert [o.tolist() for o in out] == [[[2.0]], [[4.0]]]
    assert sorted(stream.batches) == [[1.0], [2.0]]  # two batches, run at the same time
    assert alone.batches == []


def test_a_lone_request_runs_on_the_model_that_has_every_core() -> None:
    stream, alone = Model(), Model()

    async def main() -> np.ndarray:
        b = streams(stream, alone)
        out = await b.submit(rows(3))
        await b.aclose()
        return out

    assert asyncio.run(main()).tolist() == [[6.0]]
    assert alone.batches == [[3.0]]
    assert stream.batches == []


def test_no_stream_starts_while_a_lone_batch_holds_every_core() -> None:
    stream, alone = Model(), Model()
    alone.release.clear()

    async def main() -> list[np.ndarray]:
        b = streams(stream, alone)
        first = asyncio.ensure_future(b.submit(rows(1)))
        await asyncio.sleep(0.05)  # the lone request is running on every core (held)
        rest = [asyncio.ensure_future(b.submit(rows(v))) for v in (2, 3)]
        await asyncio.sleep(0.2)
        assert stream.batches == [] and not any(r.done() for r in rest)  # all waited
        alone.release.set()
        out = await asyncio.gather(first, *rest)
        await b.aclose()
        return out

    out = asyncio.run(main())
    assert [o.tolist() for o in out] == [[[2.0]], [[4.0]], [[6.0]]]
    assert alone.batches == [[1.0]]
    # After it, the two queued requests were split between the two free streams.
    assert sorted(stream.batches) == [[2.0], [3.0]]


def test_with_one_stream_every_batch_runs_on_the_one_model() -> None:
    model = Model()

    async def main() -> list[np.ndarray]:
        b = MicroBatcher(model, max_batch_size=8, max_queue_wait_s=5, streams=1)
        out = await asyncio.gather(b.submit(rows(1)), b.submit(rows(2)))
        await b.aclose()
        return out

    assert [o.tolist() for o in asyncio.run(main())] == [[[2.0]], [[4.0]]]
    assert model.batches == [[1.0, 2.0]]  # one batch: nothing runs beside it


def test_model_streams_are_one_per_usable_cpu_by_default_and_one_on_cuda() -> None:
    from service.classifier import CPU, CUDA, model_streams, usable_cpus

    assert model_streams(0, CPU) == usable_cpus()
    assert model_streams(3, CPU) == 3
    assert model_streams(0, CUDA) == 1 and model_streams(4, CUDA) == 1
