"""The Python client's retries, its API key, and the batch commands' Ctrl-C line, against
real servers on loopback: a tiny HTTP server that answers 503 (with Retry-After) before it
answers 200, and one that accepts a connection and never answers (so a real `lantern
explain` / `lantern predict` process is mid-request when it gets SIGINT).

Waits are asserted from below only (a retry came no sooner than Retry-After said), never
how fast anything is.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from lantern.client import (
    AsyncLanternClient,
    LanternClient,
    RequestRejected,
    RetryPolicy,
    ServiceError,
)
from tests.worker_fixtures import REPO, shape_png, wait_for

PREDICTION = {"label": "circle", "class_index": 0, "probability": 0.9, "top_k": []}


class Script:
    """What the server answers, in order (the last answer repeats), and what it saw."""

    def __init__(self, answers: list[tuple[int, dict[str, str]]]):
        self.answers = answers
        self.seen: list[dict[str, Any]] = []  # {"at": monotonic, "headers": {...}}
        self.lock = threading.Lock()

    def next(self, headers: dict[str, str]) -> tuple[int, dict[str, str]]:
        with self.lock:
            self.seen.append({"at": time.monotonic(), "headers": headers})
            return self.answers[min(len(self.seen) - 1, len(self.answers) - 1)]


@pytest.fixture
def scripted() -> Iterator[tuple[str, Script]]:
    script = Script([])

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            status, headers = script.next({k.lower(): v for k, v in self.headers.items()})
            body = json.dumps(
                PREDICTION if status == 200 else {"error": f"scripted {status}"}
            ).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", script
    server.shutdown()
    server.server_close()


IMAGE = ("a.png", b"not looked at by the scripted server")


def test_a_503_is_retried_after_its_retry_after_seconds(scripted: tuple[str, Script]) -> None:
    url, script = scripted
    script.answers = [(503, {"Retry-After": "1"}), (200, {})]
    with LanternClient(url) as client:
        assert client.predict(IMAGE) == PREDICTION
    assert len(script.seen) == 2
    assert script.seen[1]["at"] - script.seen[0]["at"] >= 1.0


def test_a_429_is_retried_too_and_the_async_client_retries_the_same_way(
    scripted: tuple[str, Script],
) -> None:
    url, script = scripted
    script.answers = [(429, {"Retry-After": "0.5"}), (503, {"Retry-After": "0"}), (200, {})]

    async def main() -> dict[str, Any]:
        async with AsyncLanternClient(url) as client:
            return await client.predict(IMAGE)

    assert asyncio.run(main()) == PREDICTION
    assert len(script.seen) == 3
    assert script.seen[1]["at"] - script.seen[0]["at"] >= 0.5


def test_retries_stop_after_the_attempts_and_raise_the_readable_error(
    scripted: tuple[str, Script],
) -> None:
    url, script = scripted
    script.answers = [(503, {"Retry-After": "0"})]
    expected = r"\(503\): scripted 503 \(tried 3 times\)"
    with (
        LanternClient(url, retry=RetryPolicy(attempts=3)) as client,
        pytest.raises(ServiceError, match=expected),
    ):
        client.predict(IMAGE)
    assert len(script.seen) == 3


def test_a_retry_after_beyond_the_time_cap_is_not_waited_for(
    scripted: tuple[str, Script],
) -> None:
    url, script = scripted
    script.answers = [(429, {"Retry-After": "3600"})]
    with (
        LanternClient(url, retry=RetryPolicy(attempts=5, total_s=10)) as client,
        pytest.raises(RequestRejected) as raised,
    ):
        client.predict(IMAGE)
    assert raised.value.status == 429 and len(script.seen) == 1


def test_the_api_key_is_sent_as_a_bearer_token(
    scripted: tuple[str, Script], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, script = scripted
    script.answers = [(200, {})]
    with LanternClient(url, api_key="k-123") as client:
        client.predict(IMAGE)
    monkeypatch.setenv("LANTERN_API_KEY", "from-env")

    async def main() -> None:
        async with AsyncLanternClient(url) as client:
            await client.predict(IMAGE)

    asyncio.run(main())
    assert [s["headers"].get("authorization") for s in script.seen] == [
        "Bearer k-123",
        "Bearer from-env",
    ]


# --- Ctrl-C of a batch command ----------------------------------------------------------


@pytest.fixture
def silent_server() -> Iterator[tuple[str, list[socket.socket]]]:
    """Accepts connections and never answers: a request stays in flight."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    accepted: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            accepted.append(conn)

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}", accepted
    listener.close()
    for conn in accepted:
        conn.close()


@pytest.mark.parametrize(
    ("command", "extra", "said"),
    [
        ("explain", ["--out", "maps"], "images already explained in maps are not sent again"),
        ("predict", ["--out", "results"], "results/predictions.csv are not sent again"),
    ],
)
def test_ctrl_c_of_a_batch_command_says_how_to_resume(
    silent_server: tuple[str, list[socket.socket]],
    tmp_path: Path,
    command: str,
    extra: list[str],
    said: str,
) -> None:
    url, accepted = silent_server
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.png").write_bytes(shape_png(0))
    argv = [command, "photos", "--url", url, "--no-progress", *extra]
    process = subprocess.Popen(
        [sys.executable, "-m", "lantern.cli", *argv],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: accepted or process.poll() is not None, 60, "the command's request")
        time.sleep(0.2)  # the request is written; the command waits for the answer
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"lantern {command}: interrupted; run the same command again"), err
    assert said in last
    assert last.endswith(f"lantern {' '.join(argv)}"), last


# --- the log format, in-process and from the command line ---------------------------------


def test_log_lines_carry_the_request_and_job_ids_in_both_formats() -> None:
    import io
    import logging

    from lantern.core.logs import configure_logging, log_context

    logger = logging.getLogger("lantern.test")
    root = logging.getLogger()
    saved = list(root.handlers), root.level
    try:
        for fmt in ("json", "text"):
            out = io.StringIO()
            configure_logging(fmt, stream=out)
            with log_context(request_id="r-1", job_id="ex-1"):
                logger.info("hello %s", "there")
            logger.warning("outside")
            first, second = out.getvalue().splitlines()
            if fmt == "json":
                entry = json.loads(first)
                assert entry["message"] == "hello there" and entry["logger"] == "lantern.test"
                assert (entry["request_id"], entry["job_id"], entry["level"]) == (
                    "r-1",
                    "ex-1",
                    "INFO",
                )
                assert "request_id" not in json.loads(second)
            else:
                assert first.endswith("INFO lantern.test: hello there [request_id=r-1 job_id=ex-1]")
                assert second.endswith("WARNING lantern.test: outside")
    finally:
        for handler in list(root.handlers):
            if getattr(handler, "_lantern", False):
                root.removeHandler(handler)
        for handler in saved[0]:
            if handler not in root.handlers:
                root.addHandler(handler)
        root.setLevel(saved[1])


def test_a_bad_log_format_is_a_one_line_error(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "lantern.cli", "settings"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO), "LANTERN_LOG_FORMAT": "yaml"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.strip().startswith("lantern settings: error: invalid setting")
    assert "LANTERN_LOG_FORMAT='yaml'" in done.stderr and len(done.stderr.splitlines()) == 1


def test_the_default_policy_is_five_tries_within_60_s_waiting_1_s_when_told_nothing(
    scripted: tuple[str, Script],
) -> None:
    """The README's defaults: "retried after the answer's Retry-After seconds (1 s when it
    gives none), at most attempts tries within total_s seconds (default 5 within 60 s)",
    for a client built without a policy."""
    url, script = scripted
    script.answers = [(503, {}), (200, {})]  # no Retry-After: one second
    with LanternClient(url) as client:
        assert client.predict(IMAGE) == PREDICTION
    assert len(script.seen) == 2 and script.seen[1]["at"] - script.seen[0]["at"] >= 1.0

    script.answers, script.seen = [(503, {"Retry-After": "0"})], []
    with LanternClient(url) as client, pytest.raises(ServiceError, match=r"\(tried 5 times\)"):
        client.predict(IMAGE)
    assert len(script.seen) == 5

    # A wait that would end past 60 s from the first try is not started (asked of the
    # policy itself: proving it on the wire would take a minute).
    policy, answer = RetryPolicy(), httpx.Response(503, headers={"Retry-After": "20"})
    assert policy.delay(answer, attempt=1, elapsed=40.0) == 20.0
    assert policy.delay(answer, attempt=1, elapsed=40.5) is None
