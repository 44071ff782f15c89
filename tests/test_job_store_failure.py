"""A job whose artifact store fails (here: a regular file where the job's directory must
go, as a broken or full volume would refuse the write) is retried while it has retries
(LANTERN_JOB_RETRIES: "retries of a job whose worker died or failed"), then fails with a
reason that names the file, the error and the setting to check — not "internal error" —
with a real redis-server and a real `lantern worker` logging JSON (README "Logs": one
object per line, `exception` for a traceback). A job queued behind it still runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from lantern.core.jobs import JobStatus, find_or_enqueue, job_status
from lantern.core.store import DirectoryStore
from tests.worker_fixtures import job_outcomes, settings_for, shape_png, start_worker, worker_env

pytestmark = pytest.mark.integration


def test_a_job_whose_files_cannot_be_written_is_retried_then_fails_saying_so(
    redis_server: Any, redis_conn: Any, tiny_bundle: Any, tmp_path: Path, worker_processes: list
) -> None:

    store_dir = tmp_path / "artifacts"
    settings = settings_for(redis_server.url, store_dir, job_retries=1)
    store = DirectoryStore(store_dir)
    broken_id, created = find_or_enqueue(
        redis_conn, store, [("a", shape_png(1))], tiny_bundle.tag, ["gradcam"], settings=settings
    )
    assert created and not (store_dir / broken_id).exists()  # the image travels inline
    store_dir.mkdir(parents=True, exist_ok=True)
    (store_dir / broken_id).write_text("not a directory")
    fine_id, created = find_or_enqueue(
        redis_conn, store, [("b", shape_png(2))], tiny_bundle.tag, ["saliency"], settings=settings
    )
    assert created

    env = worker_env(redis_server.url, store_dir, tiny_bundle.tag, LANTERN_LOG_FORMAT="json")
    log_path = tmp_path / "worker.log"
    worker = start_worker(env, log_path, "--burst")
    worker_processes.append(worker)
    assert worker.wait(timeout=300) == 0, log_path.read_text(errors="replace")[-3000:]

    status = job_status(redis_conn, broken_id, store, settings)
    assert status is not None and status["status"] == JobStatus.FAILED, status
    error = status["error"]
    assert "internal error" not in error, error
    assert broken_id in error and "LANTERN_ARTIFACT_DIR" in error, error
    outcomes = job_outcomes(redis_conn)
    assert outcomes == {"retried": 1, "failed": 1, "finished": 1}, outcomes
    assert redis_conn.hget(f"rq:job:{broken_id}", "retries_left") == b"0"
    fine = job_status(redis_conn, fine_id, store, settings)
    assert fine is not None and fine["status"] == JobStatus.FINISHED, fine

    # Every line the worker wrote is one JSON object; the failure carries its traceback.
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    assert all({"time", "level", "logger", "message", "process"} <= set(line) for line in lines)
    tracebacks = [line for line in lines if "exception" in line]
    assert tracebacks, [line["message"] for line in lines][-20:]
    assert any(
        "Traceback" in line["exception"] and line.get("job_id") == broken_id for line in tracebacks
    ), tracebacks[:2]


def test_a_traceback_written_into_a_message_goes_to_the_json_exception_field() -> None:
    import logging

    from lantern.core.logs import JsonFormatter

    def entry(message: str, exc_info: Any = None) -> dict[str, Any]:
        record = logging.LogRecord("rq.worker", logging.ERROR, __file__, 1, message, (), exc_info)
        return dict(json.loads(JsonFormatter().format(record)))

    written = entry("job ex-1 failed\nTraceback (most recent call last):\n  File x\nOSError: no")
    assert written["message"] == "job ex-1 failed"
    assert written["exception"] == "Traceback (most recent call last):\n  File x\nOSError: no"
    plain = entry("Traceback is a word here, on one line")
    assert plain["message"] == "Traceback is a word here, on one line" and "exception" not in plain
    try:
        raise ValueError("raised")
    except ValueError:
        import sys

        raised = entry("with exc_info", sys.exc_info())
    assert raised["message"] == "with exc_info" and "ValueError: raised" in raised["exception"]
