"""Helpers for the explanation-worker tests: images, settings, a `lantern worker` process.

conftest.py provides the fixtures redis_server, redis_conn and tiny_bundle.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from lantern.core.settings import Settings
from models.data import draw_shape

REPO = Path(__file__).resolve().parent.parent


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def shape_png(index: int, size: int = 64, width: int | None = None) -> bytes:
    """A generated shape image, optionally stretched to `width` x `size` (non-square)."""
    image = draw_shape(index, size=size).image
    if width is not None:
        image = image.resize((width, size))
    return png(image)


def worker_env(redis_url: str, artifact_dir: Path, model: str, **extra: str) -> dict[str, str]:
    """Environment for a worker process: fast heartbeats and maintenance for the tests."""
    env = dict(os.environ)
    env.update(
        {
            "REDIS_URL": redis_url,
            "LANTERN_ARTIFACT_DIR": str(artifact_dir),
            "LANTERN_MODEL": model,
            "LANTERN_DEVICE": "cpu",
            "LANTERN_QUEUE": "lantern-explain-test",
            "LANTERN_WORKER_HEARTBEAT_SECONDS": "1",
            "LANTERN_WORKER_MAINTENANCE_SECONDS": "2",
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra)
    return env


def settings_for(redis_url: str, artifact_dir: Path, **extra: object) -> Settings:
    values: dict[str, object] = {
        "redis_url": redis_url,
        "artifact_dir": artifact_dir,
        "queue": "lantern-explain-test",
        "device": "cpu",
        "worker_heartbeat_seconds": 1,
        "worker_maintenance_seconds": 2,
    }
    values.update(extra)
    return Settings(**values)  # type: ignore[arg-type]


def start_worker(env: dict[str, str], log_path: Path, *args: str) -> subprocess.Popen[bytes]:
    """A real `lantern worker` process (the console entry point, via `-m lantern.cli`)."""
    log = log_path.open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", "lantern.cli", "worker", *args],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def wait_for(
    predicate: Callable[[], object], timeout: float, what: str, poll: float = 0.1
) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)


def stop_processes(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=10)


def job_outcomes(connection: Any) -> dict[str, int]:
    """The job outcome counters /metrics reports (lantern_explain_job_outcomes_total)."""
    from lantern.core.job_metrics import JOBS_KEY

    return {k.decode(): int(v) for k, v in connection.hgetall(JOBS_KEY).items()}
