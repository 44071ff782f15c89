"""A hung Redis: it accepts connections and never answers (SIGSTOP; on a real network, a
partition that drops packets instead of refusing them). The outage tests elsewhere kill
or stop Redis, so every call fails at once; here each one waits for a timeout, and the
README's promises must still hold, with real processes (redis-server, `lantern worker`,
`lantern serve`):

- `/predict` keeps working, and does not wait for the explanation side: while 50 `/jobs`
  polls wait on Redis, a prediction is answered before any of them (it used to wait
  seconds for a thread, the polls holding anyio's whole shared pool);
- a finished job is still served from its manifest, after one Redis timeout (it used to
  retry the timeout twice, 30 s);
- `/explain` and an unfinished job's `/jobs` answer 503 with the readable reason;
- `/status` says Redis is unreachable;
- once Redis resumes, new jobs run.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.explanations import REDIS_TIMEOUT_S
from tests.conftest import TINY_CLASSES
from tests.stack_fixtures import Stack, start_stack, stop_stack
from tests.worker_fixtures import shape_png

pytestmark = pytest.mark.integration

POLLS = 50
UNAVAILABLE = "the explanation queue (Redis) is unavailable right now"


@pytest.fixture
def hung(tiny_bundle: Any, tmp_path: Path) -> Iterator[tuple[Stack, str]]:
    """A stack with one finished job, then its Redis frozen; thawed and stopped after."""
    stack = start_stack(tiny_bundle.tag, tmp_path)
    redis_pid = stack.redis.process.pid
    try:
        files = [("images", ("done.png", shape_png(1), "image/png"))]
        job_id = httpx.post(f"{stack.url}/explain", files=files, timeout=30).json()["job_id"]
        deadline = time.monotonic() + 120
        while httpx.get(f"{stack.url}/jobs/{job_id}", timeout=30).json()["status"] != "finished":
            assert time.monotonic() < deadline, "the job did not finish"
            time.sleep(0.2)
        os.kill(redis_pid, signal.SIGSTOP)
        yield stack, job_id
    finally:
        os.kill(redis_pid, signal.SIGCONT)
        stop_stack(stack)


def _predict(client: httpx.Client) -> httpx.Response:
    return client.post("/predict", files={"image": ("p.png", shape_png(0), "image/png")})


def test_a_hung_redis_holds_only_the_explanation_side_and_each_request_one_timeout(
    hung: tuple[Stack, str],
) -> None:
    stack, finished_id = hung
    with httpx.Client(base_url=stack.url, timeout=120) as client:
        predicted = _predict(client)
        assert predicted.status_code == 200 and predicted.json()["label"] in TINY_CLASSES

        status = client.get("/status").json()
        assert status["predictions"]["ready"] is True
        assert status["explanations"]["redis"] == "unreachable", status

        # The finished job, from its manifest, after one timeout (not three).
        started = time.monotonic()
        served = client.get(f"/jobs/{finished_id}")
        took = time.monotonic() - started
        assert served.status_code == 200, served.text
        assert served.json()["status"] == "finished" and served.json()["manifest"]["images"]
        assert took < 2 * REDIS_TIMEOUT_S, f"{took:.1f} s for a finished job"

        files = [("images", ("new.png", shape_png(2), "image/png"))]
        refused = client.post("/explain", files=files)
        assert refused.status_code == 503 and UNAVAILABLE in refused.json()["error"]
        assert refused.headers["retry-after"] == "5"
        unknown = client.get("/jobs/ex-" + "0" * 32)
        assert unknown.status_code == 503 and UNAVAILABLE in unknown.json()["error"]

    # Many clients polling at once: a prediction does not queue behind them.
    async def polls_and_a_prediction() -> tuple[float, list[float], int]:
        limits = httpx.Limits(max_connections=POLLS + 5)
        async with httpx.AsyncClient(base_url=stack.url, timeout=120, limits=limits) as c:

            async def poll(n: int) -> float:
                r = await c.get(f"/jobs/ex-{n:032x}")
                assert r.status_code == 503, r.text
                return time.monotonic()

            polls = [asyncio.create_task(poll(n)) for n in range(POLLS)]
            await asyncio.sleep(0.5)  # every poll is in, waiting on Redis
            r = await c.post("/predict", files={"image": ("p.png", shape_png(3), "image/png")})
            predicted_at = time.monotonic()
            return predicted_at, list(await asyncio.gather(*polls)), r.status_code

    predicted_at, polled_at, code = asyncio.run(polls_and_a_prediction())
    assert code == 200
    assert predicted_at < min(polled_at), (
        f"the prediction came {predicted_at - min(polled_at):.1f} s after the first poll's 503"
    )


def test_new_jobs_run_once_a_hung_redis_resumes(hung: tuple[Stack, str]) -> None:
    stack, _ = hung
    os.kill(stack.redis.process.pid, signal.SIGCONT)
    files = [("images", ("later.png", shape_png(3), "image/png"))]
    accepted = httpx.post(f"{stack.url}/explain", files=files, timeout=30)
    assert accepted.status_code == 202, accepted.text
    job_id = accepted.json()["job_id"]
    deadline = time.monotonic() + 120
    while (status := httpx.get(f"{stack.url}/jobs/{job_id}", timeout=30).json())[
        "status"
    ] != "finished":
        assert status["status"] in ("queued", "started") and time.monotonic() < deadline, status
        time.sleep(0.2)
