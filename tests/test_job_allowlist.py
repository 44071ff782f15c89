"""An attacker who can write to Redis cannot make a worker run code.

Jobs are written straight into the queue the way anybody with Redis access could write
them, with RQ's own classes or raw Redis commands, naming functions that would each
create a marker file. A real `lantern worker` process takes them all; no marker appears,
each job is failed with "refused: not a Lantern job", the worker keeps running, and a
genuine job queued behind them is still explained.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import Any

import pytest

from lantern.core.jobs import JobStatus, find_or_enqueue, job_status
from lantern.core.store import DirectoryStore
from tests.worker_fixtures import (
    settings_for,
    shape_png,
    start_worker,
    wait_for,
    worker_env,
)

pytestmark = pytest.mark.integration

REFUSED = "refused: not a Lantern job"


class PickledExploit:
    """Unpickling this creates the marker: proof that a pickle payload was executed."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(self.marker),))


def attacks(marker: Path) -> dict[str, tuple[str, list[Any]]]:
    """name -> (function RQ would import, its arguments); each call creates `marker`."""
    m = str(marker)
    return {
        "os.system": ("os.system", [f"touch {m}"]),
        "builtins.exec": ("builtins.exec", [f"open({m!r}, 'w').close()"]),
        "subprocess.run": ("subprocess.run", [["touch", m]]),
        "pathlib.Path.touch": ("pathlib.Path.touch", [m]),
    }


def test_each_payload_would_create_its_marker_if_called(tmp_path: Path) -> None:
    """The control: the injected payloads below are live; calling them does the harm."""
    from rq.utils import import_attribute

    for name, (func, args) in attacks(tmp_path / "marker").items():
        import_attribute(func)(*args)
        assert (tmp_path / "marker").exists(), name
        (tmp_path / "marker").unlink()


def test_injected_jobs_are_refused_and_nothing_runs(
    redis_server: Any, redis_conn: Any, tiny_bundle: Any, tmp_path: Path, worker_processes: list
) -> None:
    from rq import Callback, Queue
    from rq.serializers import JSONSerializer, PickleSerializer

    store_dir = tmp_path / "artifacts"
    settings = settings_for(redis_server.url, store_dir, job_retries=2)
    markers: dict[str, Path] = {}
    # An attacker's queue: plain RQ classes, JSON like Lantern's, retries asked for.
    queue = Queue(settings.queue, connection=redis_conn, serializer=JSONSerializer)
    injected: dict[str, str] = {}
    for name, (func, args) in attacks(tmp_path / "placeholder").items():
        markers[name] = tmp_path / f"marker-{name}"
        _, args = attacks(markers[name])[name]
        injected[name] = queue.enqueue(func, args=args, job_id=f"ex-{len(injected):032x}").id
    # Another function of Lantern's own worker package.
    injected["workers.tasks.run_job"] = queue.enqueue(
        "workers.tasks.run_job", args=[{}, "ex-" + "a" * 32, None], job_id="ex-" + "a" * 32
    ).id
    # The right function, with a callback that names os.system.
    markers["callback"] = tmp_path / "marker-callback"
    injected["callback"] = queue.enqueue(
        "workers.tasks.explain",
        args=[{"not": "a payload"}],
        on_failure=Callback("os.system"),
        on_success=Callback("os.system"),
        job_id="ex-" + "b" * 32,
    ).id
    # A pickle payload.
    markers["pickle"] = tmp_path / "marker-pickle"
    injected["pickle"] = (
        Queue(settings.queue, connection=redis_conn, serializer=PickleSerializer)
        .enqueue("os.system", PickledExploit(markers["pickle"]), job_id="ex-" + "c" * 32)
        .id
    )
    # A job record RQ cannot even parse, written with raw Redis commands.
    broken = "ex-" + "d" * 32
    data = zlib.compress(json.dumps(["os.system", None, ["true"], {}]).encode())
    redis_conn.hset(
        f"rq:job:{broken}",
        mapping={"data": data, "created_at": "not a date", "origin": settings.queue},
    )
    redis_conn.rpush(f"rq:queue:{settings.queue}", broken)
    injected["unreadable record"] = broken
    # And a genuine request behind them all.
    store = DirectoryStore(store_dir)
    genuine, _ = find_or_enqueue(
        redis_conn, store, [("a", shape_png(1))], tiny_bundle.tag, ["gradcam"], settings=settings
    )

    env = worker_env(redis_server.url, store_dir, tiny_bundle.tag)
    log = tmp_path / "worker.log"
    worker_processes.append(start_worker(env, log, "--burst"))
    assert worker_processes[0].wait(timeout=180) == 0, log.read_text()[-3000:]

    for name, marker in markers.items():
        assert not marker.exists(), f"the {name} job ran: {marker} was created"
    for name, job_id in injected.items():
        status = job_status(redis_conn, job_id, store, settings)
        assert status is not None, name
        assert status["status"] == JobStatus.FAILED, (name, status)
        assert REFUSED in (status["error"] or ""), (name, status["error"])
        retries = redis_conn.hget(f"rq:job:{job_id}", "retries_left")
        assert retries in (None, b"0"), f"{name} was retried ({retries!r} left)"
    done = wait_for(
        lambda: job_status(redis_conn, genuine, store, settings), 5, "the genuine job's status"
    )
    assert done["status"] == JobStatus.FINISHED, (done, log.read_text()[-3000:])  # type: ignore[index]
