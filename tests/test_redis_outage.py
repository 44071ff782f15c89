"""Nothing accepted is lost when Redis restarts.

Real processes throughout: a password-protected, persistent redis-server (append-only
file, appendfsync everysec, as `lantern up` runs it), two `lantern worker` processes and a
`lantern serve`. Explanation jobs are submitted over HTTP without pause; while the
workers are busy, Redis is killed (SIGKILL, then in a second round SIGTERM), left down for
a few seconds and started again on the same port and data. The API and the workers are
never restarted. Every job the API accepted (202) must end finished, with valid
artifacts: the workers retry their Redis writes through an outage this short, so none may
fail of it; a job submitted after the restart must run; /predict must answer throughout.
The counts are printed (run with -s to see them).

A SIGKILL of the Redis process loses nothing that Redis acknowledged: it writes each
command to the append-only file (the kernel's page cache) before it replies, and
`appendfsync everysec` only decides when that file is flushed to disk — the window that
a power loss or kernel crash could open, not a process crash. The test measures it:
jobs accepted in the last second before the kill are counted separately, and none may
be lost.
"""

from __future__ import annotations

import io
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import TINY_CLASSES, PersistentRedis
from tests.service_fixtures import Server, start_server, stop_server
from tests.worker_fixtures import start_worker, stop_processes, worker_env

pytestmark = pytest.mark.integration

MIN_ACCEPTED = 100  # accepted jobs before Redis is killed
OUTAGE_S = 4.0
SETTLE_TIMEOUT_S = 300.0
PASSWORD = "outage-test-password"


def noise_png(seed: int, size: int = 64) -> bytes:
    """A unique image per seed, so every job has its own id."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@dataclass
class System:
    redis: PersistentRedis
    workers: list[subprocess.Popen[bytes]]
    server: Server


@pytest.fixture
def system(tiny_bundle: Any, tmp_path: Path) -> Iterator[System]:
    redis = PersistentRedis(tmp_path / "redis", PASSWORD)
    redis.start()
    env = worker_env(redis.url, tmp_path / "artifacts", tiny_bundle.tag)
    workers = [start_worker(env, tmp_path / f"worker-{n}.log") for n in range(2)]
    shared = {k: env[k] for k in ("REDIS_URL", "LANTERN_ARTIFACT_DIR", "LANTERN_QUEUE")}
    server = start_server(tiny_bundle.tag, tmp_path / "server.log", extra_env=shared)
    logs = [tmp_path / f"worker-{n}.log" for n in range(2)]
    deadline = time.monotonic() + 120
    while not all("Listening on" in log.read_text(errors="replace") for log in logs):
        assert all(w.poll() is None for w in workers), logs[0].read_text()[-3000:]
        assert time.monotonic() < deadline, "the workers did not start in 120 s"
        time.sleep(0.2)
    yield System(redis, workers, server)
    stop_server(server)
    stop_processes(workers)
    redis.kill()


@dataclass
class Submitter:
    """Submits one-image jobs back to back until stopped; remembers what was accepted."""

    url: str
    seed0: int
    accepted: dict[str, float] = field(default_factory=dict)  # job id -> time of the 202
    refused: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as client:
            seed = self.seed0
            while not self._stop.is_set():
                seed += 1
                files = {"images": (f"n{seed}.png", noise_png(seed), "image/png")}
                try:
                    r = client.post("/explain", params={"methods": "gradcam,saliency"}, files=files)
                except httpx.HTTPError:
                    self.refused += 1
                    continue
                if r.status_code == 202:
                    self.accepted[r.json()["job_id"]] = time.monotonic()
                else:
                    assert r.status_code == 503, r.text  # Redis down: refused, not accepted
                    self.refused += 1
                    time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()


def statuses(url: str, job_ids: list[str]) -> dict[str, dict[str, Any]]:
    out = {}
    with httpx.Client(base_url=url, timeout=10) as client:
        for job_id in job_ids:
            r = client.get(f"/jobs/{job_id}")
            out[job_id] = r.json() if r.status_code == 200 else {"status": f"http {r.status_code}"}
    return out


def predict_ok(url: str) -> bool:
    files = {"image": ("p.png", noise_png(0), "image/png")}
    r = httpx.post(f"{url}/predict", files=files, timeout=30)
    return r.status_code == 200 and r.json()["label"] in TINY_CLASSES


def artifacts_valid(url: str, status: dict[str, Any]) -> bool:
    for image in status["manifest"]["images"]:
        for name, path in image["urls"].items():
            if name.endswith(("heatmap", "overlay")):
                r = httpx.get(url + path, timeout=10)
                if r.status_code != 200 or Image.open(io.BytesIO(r.content)).format != "PNG":
                    return False
    return True


def outage(system: System, sig: signal.Signals, seed0: int) -> dict[str, int]:
    url = system.server.url
    submitter = Submitter(url, seed0)
    thread = threading.Thread(target=submitter.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while len(submitter.accepted) < MIN_ACCEPTED or not any(
        s["status"] == "finished" for s in statuses(url, list(submitter.accepted)[:5]).values()
    ):
        assert time.monotonic() < deadline, "too slow to accept or run jobs"
        time.sleep(0.2)
    # The workers are busy with a backlog: now take Redis away, mid-run.
    assert system.redis.process is not None
    system.redis.process.send_signal(sig)
    killed_at = time.monotonic()
    system.redis.process.wait(timeout=30)
    time.sleep(0.5)
    submitter.stop()
    thread.join(timeout=30)
    accepted = dict(submitter.accepted)
    assert predict_ok(url), "/predict failed while Redis was down"
    down = httpx.get(f"{url}/jobs/{next(iter(accepted))}", timeout=10)
    assert down.status_code in (200, 503), down.text
    time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - killed_at)))
    system.redis.start()  # same port, same append-only file

    ids = list(accepted)
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while True:
        current = statuses(url, ids)
        pending = [i for i, s in current.items() if s["status"] in ("queued", "started")]
        if not pending or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    finished = [i for i, s in current.items() if s["status"] == "finished"]
    failed = [i for i, s in current.items() if s["status"] == "failed"]
    lost = [i for i, s in current.items() if s["status"] not in ("finished", "failed", *())]
    last_second = [i for i, t in accepted.items() if killed_at - t <= 1.0]
    counts = {
        "accepted": len(ids),
        "accepted_in_last_second": len(last_second),
        "finished": len(finished),
        "failed": len(failed),
        "lost_or_stuck": len(lost),
        "refused_503_during_outage": submitter.refused,
    }
    print(f"\nRedis {sig.name}: {counts}")
    assert not pending, f"{len(pending)} jobs still queued/started: {pending[:3]}"
    assert not lost, f"lost: {[(i, current[i]['status']) for i in lost[:5]]}"
    # The outage is seconds long, far inside LANTERN_REDIS_RETRY_SECONDS: busy workers
    # retry their Redis writes through it, so no job may fail because of it (README).
    assert not failed, f"failed: {[(i, current[i]['error']) for i in failed[:5]]}"
    assert all(artifacts_valid(url, current[i]) for i in finished[:: max(1, len(finished) // 10)])

    # The system still takes new work: a job submitted after the restart runs.
    files = {"images": ("after.png", noise_png(seed0 + 10**6), "image/png")}
    r = httpx.post(f"{url}/explain", files=files, timeout=30)
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    deadline = time.monotonic() + 120
    while (s := statuses(url, [job_id])[job_id])["status"] not in ("finished", "failed"):
        assert time.monotonic() < deadline, s
        time.sleep(0.3)
    assert s["status"] == "finished", s
    assert predict_ok(url)
    return counts


def test_no_accepted_job_is_lost_when_redis_is_killed_or_stopped_mid_run(
    system: System,
) -> None:
    killed = outage(system, signal.SIGKILL, seed0=0)
    stopped = outage(system, signal.SIGTERM, seed0=10**7)
    for counts in (killed, stopped):
        assert counts["finished"] == counts["accepted"]
        assert counts["accepted_in_last_second"] > 0  # the AOF window was really exercised
    # Nobody restarted the API or the workers: the same processes did all of it.
    assert system.server.process.poll() is None
    assert all(w.poll() is None for w in system.workers), "a worker exited"
