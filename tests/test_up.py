"""`lantern up` (what `make up` runs): the whole system from one command, stopped by Ctrl-C."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import TINY_CLASSES, free_port, start_redis
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


def _start_up(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
    log = (tmp_path / "up.log").open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", "lantern.cli", "up", "--data-dir", str(tmp_path / "var"), *args],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
        start_new_session=True,  # like a terminal: we signal the whole group below
    )


def _kill_everything(up: subprocess.Popen[bytes]) -> None:
    """After a failed test: `lantern up` and every part it started. The parts run in
    sessions of their own (a terminal's Ctrl-C reaches only `up`), so killing up's process
    group would leave them running, adopted by init; they are found first."""
    if up.poll() is not None:
        return
    parts = _children(up.pid)
    os.killpg(up.pid, signal.SIGKILL)
    for pid in parts:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    up.wait(timeout=30)


def _up_env(tag: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "LANTERN_REDIS_URL")}
    env.update(
        {
            "LANTERN_MODEL": tag,
            "LANTERN_ORT_THREADS": "1",
            "LANTERN_DEVICE": "cpu",
            "OMP_NUM_THREADS": "1",
            "LANTERN_WORKER_HEARTBEAT_SECONDS": "1",
            "LANTERN_WORKER_MAINTENANCE_SECONDS": "2",
        }
    )
    return env


def _wait_log(tmp_path: Path, text: str, timeout: float, after: int = 0) -> None:
    deadline = time.monotonic() + timeout
    while text not in (tmp_path / "up.log").read_text(errors="replace")[after:]:
        assert time.monotonic() < deadline, (
            f"{text!r} not in the log after {timeout:.0f} s:\n"
            + (tmp_path / "up.log").read_text(errors="replace")[-3000:]
        )
        time.sleep(0.3)


def _log_size(tmp_path: Path) -> int:
    return len((tmp_path / "up.log").read_text(errors="replace"))


def _pids_of(parent: int, needle: str) -> list[int]:
    """The live descendants of `parent` whose command line contains `needle`."""
    found = []
    for pid in sorted(_children(parent)):
        try:
            cmdline = (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if needle.encode() in cmdline and _alive(pid):
            found.append(pid)
    return found


def _pid_of(parent: int, needle: str) -> int:
    """The child of `parent` whose command line contains `needle`."""
    found = _pids_of(parent, needle)
    if not found:
        raise AssertionError(f"no child running {needle!r}")
    return found[0]


def _exit_times(pids: dict[str, int], up: subprocess.Popen[bytes]) -> dict[str, float]:
    """When each of `pids` was first seen gone (every 5 ms), until `up` itself exits."""
    gone: dict[str, float] = {}
    deadline = time.monotonic() + 120
    while len(gone) < len(pids) and time.monotonic() < deadline:
        now = time.monotonic()
        gone.update(
            {name: now for name, pid in pids.items() if name not in gone and not _alive(pid)}
        )
        if up.poll() is not None:
            break
        time.sleep(0.005)
    return gone


def _explain_and_wait(url: str, image: bytes, timeout: float = 120) -> dict[str, Any]:
    """Submit one explanation and wait until it finishes; its final status."""
    files = {"images": ("x.png", image, "image/png")}
    submitted = httpx.post(f"{url}/explain", files=files, timeout=30)
    assert submitted.status_code in (200, 202), submitted.text
    job_url = url + submitted.json()["status_url"]
    deadline = time.monotonic() + timeout
    while (status := httpx.get(job_url, timeout=10).json())["status"] != "finished":
        assert status["status"] != "failed", status
        assert time.monotonic() < deadline, status
        time.sleep(0.3)
    return status  # type: ignore[no-any-return]


def _predicts(url: str) -> bool:
    files = {"image": ("a.png", shape_png(1), "image/png")}
    r = httpx.post(f"{url}/predict", files=files, timeout=30)
    return r.status_code == 200 and r.json()["label"] in TINY_CLASSES


def test_up_runs_redis_a_worker_and_the_api_restarts_what_dies_and_ctrl_c_stops_them_all(
    tiny_bundle, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    import redis

    port, redis_port = free_port(), free_port()
    env = {**_up_env(tiny_bundle.tag), "LANTERN_REDIS_APPENDFSYNC": "always"}
    up = _start_up(tmp_path, env, "--port", str(port), "--redis-port", str(redis_port))
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_log(tmp_path, "Lantern is up.", 180)
        children = _children(up.pid)
        assert len(children) >= 3  # redis-server, a worker, bentoml serve (+ its workers)

        # Its own Redis, persistent, private: a password kept 0600, asked of every client.
        password_file = tmp_path / "var" / "redis" / "password"
        assert password_file.stat().st_mode & 0o777 == 0o600
        password = password_file.read_text().strip()
        assert len(password) >= 32
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=redis_port).ping()
        assert redis.Redis(port=redis_port, password=password).ping()
        # ... fsyncing as LANTERN_REDIS_APPENDFSYNC says (everysec unless told).
        fsync = redis.Redis(port=redis_port, password=password).config_get("appendfsync")
        assert fsync == {"appendfsync": "always"}
        assert password not in (tmp_path / "up.log").read_text(errors="replace")
        redis_pid = _pid_of(up.pid, "redis-server")
        assert password not in (Path("/proc") / str(redis_pid) / "cmdline").read_text()

        assert _predicts(url)
        # an explanation goes through the worker that `up` started
        first_job = _explain_and_wait(url, shape_png(1))

        # A worker SIGKILLed is restarted; /predict answers meanwhile.
        worker = _pid_of(up.pid, "lantern.cli worker")
        mark = _log_size(tmp_path)
        os.kill(worker, signal.SIGKILL)
        _wait_log(tmp_path, "worker-1 exited with status -9; restarting", 15, mark)
        assert _predicts(url)
        _wait_log(tmp_path, "worker-1 restarted", 30, mark)
        assert _pid_of(up.pid, "lantern.cli worker") != worker

        # Redis SIGKILLed is restarted on the same data; /predict answers meanwhile, and
        # the (same) worker and API take new explanations afterwards.
        mark = _log_size(tmp_path)
        os.kill(redis_pid, signal.SIGKILL)
        assert _predicts(url)
        _wait_log(tmp_path, "redis restarted", 30, mark)
        assert _pid_of(up.pid, "redis-server") != redis_pid
        # The restarted Redis has the jobs it had accepted: the first one, manifest and all.
        again = httpx.get(f"{url}/jobs/{first_job['job_id']}", timeout=10)
        assert again.status_code == 200, again.text
        assert again.json()["status"] == "finished"
        assert again.json()["manifest"] == first_job["manifest"]
        _explain_and_wait(url, shape_png(2, size=80))
        assert _predicts(url)

        # Ctrl-C, as a terminal sends it: SIGINT to the foreground process group
        children = _children(up.pid)
        os.killpg(up.pid, signal.SIGINT)
        assert up.wait(timeout=90) == 0
        time.sleep(0.5)
        assert not [pid for pid in children if _alive(pid)], "children outlived lantern up"
        text = (tmp_path / "up.log").read_text(errors="replace")
        assert "keeps crashing" not in text, text[-3000:]
    finally:
        _kill_everything(up)


def test_up_stops_everything_with_one_line_when_a_part_keeps_crashing(
    tiny_bundle, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    # Workers that cannot reach their Redis exit at once; the API starts regardless.
    env = _up_env(tiny_bundle.tag)
    env.update(
        {"REDIS_URL": f"redis://127.0.0.1:{free_port()}/0", "LANTERN_REDIS_RETRY_SECONDS": "0"}
    )
    up = _start_up(tmp_path, env, "--port", str(free_port()), "--max-restarts", "2")
    try:
        assert up.wait(timeout=240) == 1
        text = (tmp_path / "up.log").read_text(errors="replace")
        reasons = [line for line in text.splitlines() if "keeps crashing" in line]
        assert reasons == [
            "lantern up: worker-1 keeps crashing (exited with status 2 after 2 restarts in "
            "60 s); stopping everything"
        ], text[-3000:]
        assert text.count("worker-1 restarted") == 2
        time.sleep(0.5)
        assert not [pid for pid in _children(up.pid) if _alive(pid)]
    finally:
        _kill_everything(up)


def test_up_warns_loudly_when_it_listens_on_all_interfaces_without_api_keys(
    tiny_bundle, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    env = _up_env(tiny_bundle.tag)
    env.pop("LANTERN_API_KEYS", None)
    # A Redis URL on a closed port and no retries: the worker exits at once and the
    # crash loop ends the run quickly; the warning comes before anything starts.
    env.update(
        {"REDIS_URL": f"redis://127.0.0.1:{free_port()}/0", "LANTERN_REDIS_RETRY_SECONDS": "0"}
    )
    up = _start_up(
        tmp_path, env, "--host", "0.0.0.0", "--port", str(free_port()), "--max-restarts", "0"
    )
    try:
        up.wait(timeout=240)
        text = (tmp_path / "up.log").read_text(errors="replace")
        assert "WARNING: the API listens on 0.0.0.0" in text and "LANTERN_API_KEYS" in text
    finally:
        _kill_everything(up)


def test_a_part_that_exits_waits_1_s_then_twice_as_long_each_time_up_to_30_s() -> None:
    from lantern.stack import Part

    part = Part("worker-1", start=lambda: None)  # type: ignore[arg-type, return-value]
    waits = []
    for restart in range(8):
        part.restarts.append(float(restart))
        waits.append(part.backoff())
    assert waits == [1, 2, 4, 8, 16, 30, 30, 30]


def test_ctrl_c_mid_job_stops_the_api_then_the_workers_which_finish_it_then_redis(
    tiny_bundle, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """The README's Ctrl-C: "stops the API, then the workers (each finishes its job), then
    Redis", with `--workers 2`; and the next `lantern up` on the same data serves the job."""
    port, redis_port = free_port(), free_port()
    args = ("--port", str(port), "--redis-port", str(redis_port), "--workers", "2")
    env = _up_env(tiny_bundle.tag)
    url = f"http://127.0.0.1:{port}"
    up = _start_up(tmp_path, env, *args)
    try:
        _wait_log(tmp_path, "Lantern is up.", 180)
        # A job long enough to be caught mid-way (every map and faithfulness: ~5 s here),
        # well within the 30 s the supervisor gives a worker to stop (STOP_TIMEOUT_S).
        files = [("images", (f"{i}.png", shape_png(i % 4, size=64), "image/png")) for i in range(8)]
        params = {"methods": "gradcam,gradcam_pp,saliency,activations", "faithfulness": "true"}
        r = httpx.post(f"{url}/explain", params=params, files=files, timeout=60)
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        deadline = time.monotonic() + 120
        while (status := httpx.get(f"{url}/jobs/{job_id}", timeout=10).json())["status"] != (
            "started"
        ):
            assert status["status"] == "queued", status
            assert time.monotonic() < deadline, status
            time.sleep(0.05)
        workers = _pids_of(up.pid, "lantern.cli worker")
        assert len(workers) == 2, workers  # --workers 2
        parts = {
            "api": _pid_of(up.pid, "-m bentoml serve"),  # lantern serve execs it
            **{f"worker-{n}": pid for n, pid in enumerate(workers, 1)},
            "redis": _pid_of(up.pid, "redis-server"),
        }
        mark = _log_size(tmp_path)
        os.killpg(up.pid, signal.SIGINT)  # Ctrl-C while a worker is on it
        gone = _exit_times(parts, up)
        assert up.wait(timeout=120) == 0
    finally:
        _kill_everything(up)
    text = (tmp_path / "up.log").read_text(errors="replace")[mark:]
    # The worker finished the job before it stopped: RQ's success line comes after the signal.
    assert f"Job OK ({job_id})" in text, text[-3000:]
    # In that order: the API first (no new work), then the workers, then Redis last, so
    # the workers could still record the job they finished.
    assert set(gone) == set(parts), (gone, text[-3000:])
    worker_times = [gone[name] for name in parts if name.startswith("worker-")]
    assert gone["api"] <= min(worker_times) and max(worker_times) <= gone["redis"], gone

    # The next `lantern up` on the same data serves the finished job, manifest and all.
    (tmp_path / "up.log").rename(tmp_path / "first-up.log")
    again = _start_up(tmp_path, env, *args)
    try:
        _wait_log(tmp_path, "Lantern is up.", 180)
        status = httpx.get(f"{url}/jobs/{job_id}", timeout=10).json()
        assert status["status"] == "finished", status
        assert len(status["manifest"]["images"]) == 8
        os.killpg(again.pid, signal.SIGINT)
        assert again.wait(timeout=90) == 0
    finally:
        _kill_everything(again)


def test_up_uses_a_given_redis_and_restarts_an_api_killed_outright(
    tiny_bundle, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """README: with REDIS_URL set "that Redis is used as given" (no Redis of its own), and
    "a worker, the API or Redis that exits is started again". The API is killed with
    SIGKILL, as the OOM killer would: its server worker (which BentoML starts in a session
    of its own, holding the port) must stop with it, or every restart fails to bind."""
    import redis

    given = start_redis(tmp_path / "given-redis")
    port = free_port()
    up = _start_up(
        tmp_path, {**_up_env(tiny_bundle.tag), "REDIS_URL": given.url}, "--port", str(port)
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_log(tmp_path, "Lantern is up.", 180)
        assert _pids_of(up.pid, "redis-server") == [] and not (tmp_path / "var" / "redis").exists()
        job = _explain_and_wait(url, shape_png(1))
        assert redis.Redis.from_url(given.url).exists(f"rq:job:{job['job_id']}")

        api = _pid_of(up.pid, "-m bentoml serve")
        server_workers = _pids_of(api, "_bentoml_impl.worker")
        assert server_workers, "no server worker under the API"
        mark = _log_size(tmp_path)
        os.kill(api, signal.SIGKILL)
        _wait_log(tmp_path, "api exited with status -9; restarting", 15, mark)
        _wait_log(tmp_path, "api restarted", 30, mark)
        deadline = time.monotonic() + 120
        while True:
            try:
                if _predicts(url):
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "up.log").read_text()[mark:][-3000:]
            time.sleep(0.5)
        assert not [pid for pid in server_workers if _alive(pid)], "the old server worker lives on"
        text = (tmp_path / "up.log").read_text(errors="replace")[mark:]
        assert "Address already in use" not in text and "keeps crashing" not in text, text[-3000:]
        assert _pid_of(up.pid, "-m bentoml serve") != api
    finally:
        _kill_everything(up)
        given.stop()
