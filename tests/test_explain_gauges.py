"""What /metrics and /status say of the explanation side is what is there (README
"Metrics": lantern_explain_queue_depth, lantern_explain_jobs{status}, lantern_explain_workers
"(live)"), read from a real `lantern serve` while real jobs wait, run and end and a real
worker starts and is killed. Other tests only ever saw these at 0, which a gauge stuck at
0 would pass."""

from __future__ import annotations

import re
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest

from lantern.client import JobError, LanternClient
from tests.conftest import start_redis
from tests.service_fixtures import start_server, stop_server
from tests.worker_fixtures import shape_png, start_worker, wait_for, worker_env

pytestmark = pytest.mark.integration

QUEUED = 3
BIG = 64  # images of the job watched while it runs (two methods, faithfulness)


def gauges(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    found = {
        m.group(1): float(m.group(2))
        for m in re.finditer(
            r"^(lantern_explain_(?:queue_depth|workers|jobs\{[^}]*\})) (\S+)$", text, re.M
        )
    }
    return found


def same_on_status(url: str, found: dict[str, float]) -> None:
    """/status says what /metrics said (called only while nothing moves)."""
    status = httpx.get(f"{url}/status", timeout=10).json()["explanations"]
    assert status["queue_depth"] == found["lantern_explain_queue_depth"], (status, found)
    assert status["workers"] == found["lantern_explain_workers"], (status, found)


def test_the_queue_job_and_worker_gauges_follow_real_jobs_and_a_killed_worker(
    tiny_bundle: Any, tmp_path: Path, worker_processes: list
) -> None:
    redis = start_redis(tmp_path / "redis")
    env = worker_env(redis.url, tmp_path / "artifacts", tiny_bundle.tag)
    shared = {k: env[k] for k in ("REDIS_URL", "LANTERN_ARTIFACT_DIR", "LANTERN_QUEUE")}
    server = start_server(tiny_bundle.tag, tmp_path / "server.log", extra_env=shared)
    try:
        url = server.url
        big = [("images", (f"b{i}.png", shape_png(i, size=64), "image/png")) for i in range(BIG)]
        first = httpx.post(
            f"{url}/explain", params={"methods": "gradcam,saliency", "faithfulness": "true"},
            files=big, timeout=60,
        )  # fmt: skip
        assert first.status_code == 202, first.text
        for n in range(1, QUEUED):
            files = [("images", (f"s{n}.png", shape_png(n, size=48 + n), "image/png"))]
            assert httpx.post(f"{url}/explain", files=files, timeout=30).status_code == 202
        # No worker yet: everything waits.
        waiting = gauges(url)
        assert waiting["lantern_explain_queue_depth"] == QUEUED
        assert waiting['lantern_explain_jobs{status="queued"}'] == QUEUED
        assert waiting['lantern_explain_jobs{status="started"}'] == 0
        assert waiting["lantern_explain_workers"] == 0
        same_on_status(url, waiting)
        # lantern.client's wait(timeout=...) gives up on a job nobody runs, and says why.
        seen: list[str] = []
        with LanternClient(url) as client, pytest.raises(JobError) as gave_up:
            client.wait(
                first.json()["job_id"], timeout=1.5, on_progress=lambda s: seen.append(s["status"])
            )
        assert "still queued after 2 s" in str(gave_up.value) and "lantern worker" in str(
            gave_up.value
        )
        assert first.json()["job_id"] in str(gave_up.value) and seen and set(seen) == {"queued"}

        worker = start_worker(env, tmp_path / "worker.log")
        worker_processes.append(worker)
        big_id = first.json()["job_id"]

        def big_started() -> bool:
            return httpx.get(f"{url}/jobs/{big_id}", timeout=10).json()["status"] == "started"

        wait_for(big_started, 180, "the big job to start", poll=0.05)
        running = gauges(url)
        assert running['lantern_explain_jobs{status="started"}'] == 1, running
        assert running["lantern_explain_queue_depth"] == QUEUED - 1, running
        assert running["lantern_explain_workers"] == 1, running

        def all_finished() -> bool:
            return gauges(url)['lantern_explain_jobs{status="finished"}'] == QUEUED

        wait_for(all_finished, 300, "every job to finish", poll=0.5)
        done = gauges(url)
        assert done["lantern_explain_queue_depth"] == 0
        assert done['lantern_explain_jobs{status="started"}'] == 0
        assert done["lantern_explain_workers"] == 1
        same_on_status(url, done)

        # A worker killed without a goodbye stops counting within three of its longest
        # gaps between heartbeats (here 1 s beats, 2 s idle waits: 6 s), not RQ's 8 min.
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=10)
        wait_for(lambda: gauges(url)["lantern_explain_workers"] == 0, 30, "the dead worker to go")
        same_on_status(url, gauges(url))
    finally:
        stop_server(server)
        redis.stop()
