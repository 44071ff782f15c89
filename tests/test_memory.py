"""service.memory: BentoML's TimeoutMiddleware, patched, cancels its timer; still times out."""

from __future__ import annotations

import asyncio

import httpx
from bentoml._internal.server.http.traffic import TimeoutMiddleware
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from service.memory import MallocTrimmer, patch_timeout_middleware


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
    trimmer.interval_s = 0
    assert trimmer.maybe_trim() is (trimmer._trim is not None)
