"""service.memory: BentoML's TimeoutMiddleware, patched, cancels its timer and still times out;
glibc's trim and ONNX Runtime's arena shrinkage run at most once per interval, and the
sessions the service creates accept the shrinkage (their CPU arena is on)."""

from __future__ import annotations

import asyncio
import threading

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from bentoml._internal.server.http.traffic import TimeoutMiddleware
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from service import classifier
from service.memory import (
    ARENA_SHRINKAGE,
    ArenaShrinker,
    AtMostEvery,
    MallocTrimmer,
    patch_timeout_middleware,
)


async def _ok(_: object) -> PlainTextResponse:
    return PlainTextResponse("ok")


async def _slow(_: object) -> PlainTextResponse:
    await asyncio.sleep(5)
    return PlainTextResponse("late")


def _app(timeout: float) -> TimeoutMiddleware:
    return TimeoutMiddleware(Starlette(routes=[Route("/", _ok), Route("/slow", _slow)]), timeout)


def test_no_live_timer_is_left_behind_by_a_finished_request() -> None:
    assert patch_timeout_middleware() and patch_timeout_middleware()  # idempotent

    async def go() -> int:
        transport = httpx.ASGITransport(app=_app(300))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            for _ in range(20):
                assert (await client.get("/")).text == "ok"
        loop = asyncio.get_running_loop()
        return sum(not h.cancelled() for h in loop._scheduled)  # type: ignore[attr-defined]

    # Unpatched, each of the 20 requests leaves a 300-s timer holding its context.
    assert asyncio.run(go()) == 0


def test_a_slow_request_still_gets_504() -> None:
    patch_timeout_middleware()

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=_app(0.05))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.get("/slow")

    response = asyncio.run(go())
    assert response.status_code == 504
    assert "Not able to process the request" in response.json()["error"]


def test_trimmer_trims_at_most_once_per_interval() -> None:
    trimmer = MallocTrimmer(interval_s=3600)
    assert not trimmer.maybe_trim()  # the interval starts at creation
    trimmer.every.interval_s = 0
    assert trimmer.maybe_trim() is (trimmer._trim is not None)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_at_most_every_is_due_once_per_interval_and_to_one_thread() -> None:
    clock = FakeClock()
    every = AtMostEvery(2.0, clock)
    assert not every.due()  # the interval starts at creation
    clock.now += 1.9
    assert not every.due()
    clock.now += 0.2
    # Eight threads ask at the same moment: exactly one of them is told to go.
    answers: list[bool] = []
    start = threading.Barrier(8)

    def ask() -> None:
        start.wait()
        answers.append(every.due())

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(answers) == [False] * 7 + [True]
    assert not every.due()  # the next interval starts from that moment
    clock.now += 2.0
    assert every.due()


def test_shrinker_asks_for_cpu_arena_shrinkage_once_per_interval() -> None:
    clock = FakeClock()
    shrinker = ArenaShrinker(interval_s=2.0, clock=clock)
    assert shrinker.run_options() is None
    clock.now += 2.5
    options = shrinker.run_options()
    assert isinstance(options, ort.RunOptions)
    assert options.get_run_config_entry(ARENA_SHRINKAGE) == "cpu:0"
    assert shrinker.run_options() is None
    clock.now += 2.0
    assert shrinker.run_options() is options


@pytest.mark.parametrize("threads", [0, 1], ids=["all-cores session", "stream session"])
def test_the_services_sessions_run_with_arena_shrinkage(tiny_bundle, threads: int) -> None:  # type: ignore[no-untyped-def]
    """ONNX Runtime refuses a shrinking run on a session without a CPU arena, so this fails
    if the service's sessions lose their arena while the service still asks it to shrink;
    and a shrinking run answers what a plain one does."""
    session = classifier.create_session(tiny_bundle.onnx_path, provider="cpu", threads=threads)
    clock = FakeClock()
    shrinker = ArenaShrinker(interval_s=1.0, clock=clock)
    size = tiny_bundle.preprocess.crop_size
    batch = np.random.default_rng(0).standard_normal((4, 3, size, size)).astype(np.float32)
    plain = classifier.run(session, batch)
    clock.now += 1.0
    options = shrinker.run_options()
    assert options is not None
    shrunk = classifier.run(session, batch, options)
    np.testing.assert_array_equal(shrunk, plain)
    np.testing.assert_array_equal(classifier.run(session, batch), plain)  # after the shrink


def test_a_session_without_its_cpu_arena_refuses_shrinkage(tiny_bundle) -> None:  # type: ignore[no-untyped-def]
    """Why the test above can fail: what ONNX Runtime does when the arena is off."""
    options = classifier.session_options(threads=1)
    options.enable_cpu_mem_arena = False
    session = ort.InferenceSession(
        str(tiny_bundle.onnx_path), options, providers=["CPUExecutionProvider"]
    )
    clock = FakeClock()
    shrinker = ArenaShrinker(interval_s=0.0, clock=clock)
    size = tiny_bundle.preprocess.crop_size
    batch = np.zeros((1, 3, size, size), np.float32)
    with pytest.raises(Exception, match="arena"):
        classifier.run(session, batch, shrinker.run_options())
