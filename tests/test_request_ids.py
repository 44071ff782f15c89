"""Logs machines can read, a request id from the API to the worker, and the Python client,
against one real stack (redis-server, `lantern worker`, `lantern serve`) started with
LANTERN_LOG_FORMAT=json. One stack for all of it: starting one costs most of the time.

- every line `lantern serve` (BentoML's arbiter and server worker) and `lantern worker`
  (RQ included) write is one JSON object with time, level, logger and message;
- an explanation asked with `X-Request-ID: <id>` gets it back in the response, and the
  same id is in the API's access line, in the job's metadata in Redis and on the
  worker's lines for that job; an unsafe X-Request-ID is replaced by a generated one;
- AsyncLanternClient predicts, explains, waits with progress and downloads;
- the README's "Python client" examples run as written (URL and image aside).
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from lantern.client import AsyncLanternClient, LanternClient
from lantern.core.jobs import META_REQUEST_ID
from tests.stack_fixtures import Stack, start_stack, stop_stack
from tests.worker_fixtures import REPO, shape_png, wait_for

pytestmark = pytest.mark.integration

REQUEST_ID = "trace-7f3a.c1"
LOG_KEYS = {"time", "level", "logger", "message"}


@pytest.fixture(scope="module")
def json_stack(tiny_bundle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:  # type: ignore[no-untyped-def]
    running = start_stack(
        tiny_bundle.tag,
        tmp_path_factory.mktemp("json-stack"),
        env={"LANTERN_LOG_FORMAT": "json"},
    )
    yield running
    stop_stack(running)


def log_lines(path: Path) -> list[dict[str, Any]]:
    """Every non-empty line of a process's output, each parsed as JSON (fails otherwise)."""
    entries = []
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            raise AssertionError(f"{path.name}: not a JSON line: {line!r}") from None
        assert isinstance(entry, dict) and entry.keys() >= LOG_KEYS, line
        entries.append(entry)
    return entries


def worker_log(stack: Stack) -> Path:
    return stack.server.log.parent / "worker.log"


@pytest.fixture(scope="module")
def explained(json_stack: Stack) -> dict[str, Any]:
    """One job, asked for with our X-Request-ID, run to the end."""
    response = httpx.post(
        json_stack.url + "/explain",
        files=[("images", ("tom.png", shape_png(1), "image/png"))],
        data={"methods": "gradcam"},
        headers={"X-Request-ID": REQUEST_ID},
        timeout=60,
    )
    assert response.status_code == 202, response.text
    job_id = response.json()["job_id"]
    with LanternClient(json_stack.url) as client:
        status = client.wait(job_id, timeout=120)
    return {"response": response, "job_id": job_id, "status": status}


def test_the_request_id_goes_from_the_api_to_the_job_and_the_worker(
    json_stack: Stack, explained: dict[str, Any]
) -> None:
    import redis
    from rq.job import Job
    from rq.serializers import JSONSerializer

    job_id = explained["job_id"]
    assert explained["response"].headers["X-Request-ID"] == REQUEST_ID

    # The API: its access line for the request, and the line saying it queued the job.
    def api_lines() -> list[dict[str, Any]]:
        return [e for e in log_lines(json_stack.server.log) if e.get("request_id") == REQUEST_ID]

    wait_for(
        lambda: any(e["logger"] == "bentoml.access" for e in api_lines()), 10, "the access line"
    )
    access = [e for e in api_lines() if e["logger"] == "bentoml.access"]
    assert len(access) == 1 and "path=/explain" in access[0]["message"], access
    queued = [e for e in api_lines() if e["logger"] == "lantern.service"]
    assert any(e.get("job_id") == job_id and "queued" in e["message"] for e in queued), queued

    # The job's metadata in Redis.
    connection = redis.Redis.from_url(json_stack.redis.url)
    try:
        job = Job.fetch(job_id, connection=connection, serializer=JSONSerializer)
        assert job.meta[META_REQUEST_ID] == REQUEST_ID
    finally:
        connection.close()

    # The worker: RQ's own lines and the task's, all naming the job and the request.
    for_job = [e for e in log_lines(worker_log(json_stack)) if e.get("job_id") == job_id]
    assert for_job, "no worker line names the job"
    assert all(e.get("request_id") == REQUEST_ID for e in for_job), for_job
    loggers = {e["logger"] for e in for_job}
    assert "workers.tasks" in loggers and any(name.startswith("rq.") for name in loggers), loggers


def test_every_line_of_the_server_and_the_worker_is_json(
    json_stack: Stack, explained: dict[str, Any]
) -> None:
    server = log_lines(json_stack.server.log)
    worker = log_lines(worker_log(json_stack))
    # BentoML's arbiter and its server worker, Lantern's own lines, RQ's worker lines.
    assert {"bentoml.serve", "bentoml.access", "lantern.serve", "lantern.service"} <= {
        e["logger"] for e in server
    }
    assert {"rq.worker", "workers.tasks"} <= {e["logger"] for e in worker}
    for entry in server + worker:
        assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d$", entry["time"])
        assert entry["level"] in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}


@pytest.mark.parametrize("sent", ["has spaces", "x" * 65, "../../etc", "ünïcode", ""])
def test_an_unsafe_request_id_is_replaced_by_a_generated_one(json_stack: Stack, sent: str) -> None:
    response = httpx.get(
        json_stack.url + "/model", headers={"X-Request-ID": sent.encode()}, timeout=30
    )
    assert response.status_code == 200
    given = response.headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", given), given

    def access_line() -> bool:
        return any(
            e.get("request_id") == given and e["logger"] == "bentoml.access"
            for e in log_lines(json_stack.server.log)
        )

    wait_for(access_line, 10, "the access line with the generated id")


def test_a_request_without_an_id_gets_one(json_stack: Stack) -> None:
    first = httpx.get(json_stack.url + "/livez", timeout=30).headers["X-Request-ID"]
    second = httpx.get(json_stack.url + "/livez", timeout=30).headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", first) and first != second


def test_the_async_client_predicts_explains_waits_and_downloads(
    json_stack: Stack, tmp_path: Path
) -> None:
    seen: list[dict[str, Any]] = []

    async def main() -> tuple[Any, ...]:
        async with AsyncLanternClient(json_stack.url) as client:
            one, many = await asyncio.gather(
                client.predict(("a.png", shape_png(0))),
                client.predict_batch([("b.png", shape_png(2)), ("c.png", shape_png(3))]),
            )
            job = await client.explain([("d.png", shape_png(2))], methods=["saliency"])
            status = await client.wait(job["job_id"], timeout=120, on_progress=seen.append)
            files = await client.download_all(status, tmp_path / "d")
            return one, many, status, files

    one, many, status, files = asyncio.run(main())
    with LanternClient(json_stack.url) as sync:
        assert sync.predict(("a.png", shape_png(0))) == one  # the same answer either way
    assert len(many) == 2 and {"label", "probability", "top_k"} <= many[0].keys()
    assert status["status"] == "finished" and seen[-1]["status"] == "finished"
    names = sorted(p.name for p in files)
    assert "d.saliency.overlay.png" in names and "d.saliency.npy" in names
    assert all(p.stat().st_size > 0 for p in files)
    assert (tmp_path / "d" / "d.saliency.overlay.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def readme_examples() -> list[str]:
    """The ```python blocks of the README's "Python client" section."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Python client", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_the_readme_python_client_examples_run(json_stack: Stack, tmp_path: Path) -> None:
    examples = readme_examples()
    assert len(examples) >= 3
    (tmp_path / "cat.jpg").write_bytes(shape_png(0))  # any image under the example's name
    (tmp_path / "dog.png").write_bytes(shape_png(1))
    for number, code in enumerate(examples):
        script = tmp_path / f"example_{number}.py"
        script.write_text(code.replace("http://127.0.0.1:3000", json_stack.url))
        done = subprocess.run(
            [sys.executable, str(script)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=180,
            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "LANTERN_API_KEY": ""},
        )
        assert done.returncode == 0, f"example {number}:\n{code}\n{done.stdout}\n{done.stderr}"
