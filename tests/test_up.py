"""`lantern up` (what `make up` runs): the whole system from one command, stopped by Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import TINY_CLASSES, free_port
from tests.worker_fixtures import shape_png

pytestmark = pytest.mark.integration


def _children(pid: int) -> set[int]:
    """Every descendant process of `pid` (from /proc)."""
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        parent = frontier.pop()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == parent and int(entry.name) not in found:
                found.add(int(entry.name))
                frontier.add(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_up_runs_redis_a_worker_and_the_api_and_ctrl_c_stops_them_all(
    tiny_bundle, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    port, redis_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "LANTERN_REDIS_URL")}
    env.update(
        {
            "LANTERN_MODEL": tiny_bundle.tag,
            "LANTERN_ORT_THREADS": "1",
            "LANTERN_DEVICE": "cpu",
            "OMP_NUM_THREADS": "1",
        }
    )
    log = (tmp_path / "up.log").open("wb")
    up = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lantern.cli",
            "up",
            "--port",
            str(port),
            "--redis-port",
            str(redis_port),
            "--data-dir",
            str(tmp_path / "var"),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
        start_new_session=True,  # like a terminal: we signal the whole group below
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while "Lantern is up." not in (tmp_path / "up.log").read_text(errors="replace"):
            assert up.poll() is None, (tmp_path / "up.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "lantern up did not come up in 180 s"
            time.sleep(0.5)

        children = _children(up.pid)
        assert len(children) >= 3  # redis-server, a worker, bentoml serve (+ its workers)

        # its own Redis, persistent, on the port asked for
        assert (tmp_path / "var" / "redis").is_dir()
        files = {"image": ("a.png", shape_png(1), "image/png")}
        predicted = httpx.post(f"{url}/predict", files=files, timeout=30)
        assert predicted.status_code == 200 and predicted.json()["label"] in TINY_CLASSES

        # an explanation goes through the worker that `up` started
        submitted = httpx.post(f"{url}/explain", files={"images": files["image"]}, timeout=30)
        assert submitted.status_code == 202, submitted.text
        job_url = url + submitted.json()["status_url"]
        while (status := httpx.get(job_url, timeout=10).json())["status"] != "finished":
            assert status["status"] != "failed", status
            assert time.monotonic() < deadline + 60, status
            time.sleep(0.3)
        assert (tmp_path / "var" / "artifacts" / submitted.json()["job_id"]).is_dir()

        # Ctrl-C, as a terminal sends it: SIGINT to the foreground process group
        os.killpg(up.pid, signal.SIGINT)
        assert up.wait(timeout=90) == 0
        time.sleep(0.5)
        assert not [pid for pid in children if _alive(pid)], "children outlived lantern up"
        text = (tmp_path / "up.log").read_text(errors="replace")
        assert "Traceback" not in text, text[-3000:]
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
        for pid in _children(up.pid):
            os.kill(pid, signal.SIGKILL)
