"""API keys, bounded request metrics, explanation metrics, /status, and finished jobs during
a Redis outage, against real processes: a redis-server, a `lantern worker` and a
`lantern serve` with LANTERN_API_KEYS, over loopback.

The Redis-outage test stops the Redis of a stack of its own, so the tests run in any order.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from lantern.client import LanternClient, Unauthorized
from lantern.core.job_metrics import record_job
from tests.service_fixtures import start_server, stop_server
from tests.stack_fixtures import Stack, start_stack, stop_stack
from tests.worker_fixtures import shape_png

pytestmark = pytest.mark.integration

KEYS = ("first-key-" + "a" * 20, "second-key-" + "b" * 20)
GOOD = {"Authorization": f"Bearer {KEYS[0]}"}


@pytest.fixture(scope="module")
def keyed(tiny_bundle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:  # type: ignore[no-untyped-def]
    running = start_stack(
        tiny_bundle.tag,
        tmp_path_factory.mktemp("keyed"),
        server_env={"LANTERN_API_KEYS": ",".join(KEYS)},
    )
    yield running
    stop_stack(running)


def _series(text: str) -> set[str]:
    """Every sample line's name and labels (one entry per series) of a /metrics body."""
    return {line.rsplit(" ", 1)[0] for line in text.splitlines() if line and line[0] != "#"}


def _metrics(stack: Stack) -> str:
    response = httpx.get(stack.url + "/metrics", headers=GOOD, timeout=10)
    assert response.status_code == 200, response.text
    return response.text


# --- API keys -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method,path",
    [
        ("POST", "/predict"),
        ("POST", "/predict_batch"),
        ("POST", "/explain"),
        ("GET", "/jobs/ex-" + "0" * 32),
        ("GET", "/jobs/ex-" + "0" * 32 + "/x.png"),
        ("GET", "/status"),
        ("GET", "/metrics"),  # BentoML's own routes too
        ("GET", "/docs.json"),
        ("GET", "/no/such/route"),
    ],
)
def test_every_route_needs_a_key(keyed: Stack, method: str, path: str) -> None:
    for headers, word in (
        ({}, "needs an API key"),
        ({"Authorization": "Bearer wrong"}, "not valid"),
        ({"X-API-Key": KEYS[0][:-1]}, "not valid"),
        ({"Authorization": f"Basic {KEYS[0]}"}, "needs an API key"),
    ):
        response = httpx.request(method, keyed.url + path, headers=headers, timeout=10)
        assert response.status_code == 401, (path, headers, response.text)
        assert response.headers["www-authenticate"].startswith("Bearer")
        assert response.headers["content-type"] == "application/json"
        assert word in response.json()["error"]


def test_probes_and_the_page_shell_need_no_key(keyed: Stack) -> None:
    for path in ("/livez", "/readyz", "/", "/static/app.js"):
        assert httpx.get(keyed.url + path, timeout=10).status_code == 200, path


def test_either_key_works_as_bearer_or_x_api_key(keyed: Stack) -> None:
    image = {"image": ("a.png", shape_png(0), "image/png")}
    for headers in (
        {"Authorization": f"Bearer {KEYS[0]}"},
        {"authorization": f"bearer {KEYS[1]}"},
        {"X-API-Key": KEYS[1]},
    ):
        response = httpx.post(keyed.url + "/predict", files=image, headers=headers, timeout=30)
        assert response.status_code == 200, response.text
    assert httpx.get(keyed.url + "/docs.json", headers=GOOD, timeout=10).status_code == 200
    assert httpx.get(keyed.url + "/metrics", headers=GOOD, timeout=10).status_code == 200


def test_keys_never_reach_the_log(keyed: Stack) -> None:
    httpx.get(keyed.url + "/status", headers={"X-API-Key": "wrong-key-in-log"}, timeout=10)
    httpx.get(keyed.url + "/status", headers=GOOD, timeout=10)
    time.sleep(0.5)
    log = keyed.server.log_text()
    assert all(k not in log for k in (*KEYS, "wrong-key-in-log"))


def test_the_client_and_the_batch_command_send_the_key(keyed: Stack, tmp_path: Path) -> None:
    image = ("a.png", shape_png(1))
    with LanternClient(keyed.url, api_key=KEYS[1]) as client:
        assert client.predict(image)["label"]
    with LanternClient(keyed.url, api_key="") as client, pytest.raises(Unauthorized) as e:
        client.predict(image)
    assert "--api-key" in str(e.value) and "LANTERN_API_KEY" in str(e.value)

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(image[1])
    cmd = [sys.executable, "-m", "lantern.cli", "predict", str(tmp_path / "in"), "--url"]
    cmd += [keyed.url, "--out", str(tmp_path / "out"), "--no-progress"]
    env = {k: v for k, v in os.environ.items() if k != "LANTERN_API_KEY"}
    refused = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "LANTERN_API_KEY" in refused.stderr, refused.stderr
    by_flag = subprocess.run(
        [*cmd, "--api-key", KEYS[0]], env=env, capture_output=True, text=True, timeout=120
    )
    assert by_flag.returncode == 0, by_flag.stderr
    by_env = subprocess.run(
        cmd, env={**env, "LANTERN_API_KEY": KEYS[1]}, capture_output=True, text=True, timeout=120
    )
    assert by_env.returncode == 0, by_env.stderr
    assert "a.png" in (tmp_path / "out" / "predictions.csv").read_text()


# --- bounded request metrics --------------------------------------------------------------


def test_random_paths_add_no_metric_series(keyed: Stack) -> None:
    with httpx.Client(base_url=keyed.url, headers=GOOD, timeout=10) as http:

        def burst(n: int) -> None:
            for i in range(n):
                token = secrets.token_hex(16)
                if i % 3 == 0:
                    assert http.get(f"/jobs/ex-{token}/x.png").status_code == 404
                elif i % 3 == 1:
                    assert http.get(f"/{token}/{i}").status_code == 404
                else:
                    assert http.get(f"/jobs/ex-{token}").status_code in (404, 503)

        burst(6)  # every (route, status) pair once
        before = _series(_metrics(keyed))
        burst(1000)
        after = _series(_metrics(keyed))
    request_series = [s for s in after if "request_" in s]
    print(f"series before {len(before)}, after 1000 random requests {len(after)}")
    assert after == before, sorted(after - before)[:10]
    assert any('endpoint="/jobs/{job_id}/{name}"' in s for s in request_series)
    assert any('endpoint="other"' in s for s in request_series)
    assert not any("ex-" in s for s in after)


# --- explanation metrics and /status ---------------------------------------------------------


def _finish_a_job(stack: Stack) -> dict[str, Any]:
    files = [("images", ("cat.png", shape_png(2), "image/png"))]
    response = httpx.post(stack.url + "/explain", files=files, headers=GOOD, timeout=60)
    assert response.status_code in (200, 202), response.text
    job_id = response.json()["job_id"]
    deadline = time.monotonic() + 120
    while True:
        status = httpx.get(f"{stack.url}/jobs/{job_id}", headers=GOOD, timeout=10).json()
        if status["status"] in ("finished", "failed"):
            assert status["status"] == "finished", status
            return dict(status)
        assert time.monotonic() < deadline, status
        time.sleep(0.3)


def _value(text: str, series: str) -> float:
    match = re.search(rf"^{re.escape(series)} (\S+)$", text, re.M)
    assert match, f"{series} missing from /metrics"
    return float(match.group(1))


def test_metrics_show_the_explanation_side(keyed: Stack) -> None:
    _finish_a_job(keyed)
    # The worker itself recorded the real job's outcome, duration and time per image.
    text = _metrics(keyed)
    assert _value(text, 'lantern_explain_job_outcomes_total{outcome="finished"}') >= 1
    assert _value(text, "lantern_explain_job_duration_seconds_count") >= 1
    assert _value(text, "lantern_explain_image_seconds_count") >= 1
    conn = redis.Redis.from_url(keyed.redis.url)
    record_job(conn, 3.0, 2, "finished")
    record_job(conn, 700.0, 1, "failed")
    record_job(conn, 0.2, 4, "retried")
    text = _metrics(keyed)
    assert _value(text, "lantern_explanations_available") == 1
    assert _value(text, "lantern_explain_workers") == 1
    assert _value(text, "lantern_explain_queue_depth") == 0
    assert _value(text, 'lantern_explain_jobs{status="finished"}') >= 1
    assert _value(text, 'lantern_explain_jobs{status="failed"}') == 0
    for outcome in ("finished", "failed", "retried"):
        assert _value(text, f'lantern_explain_job_outcomes_total{{outcome="{outcome}"}}') >= 1
    assert _value(text, 'lantern_explain_job_duration_seconds_bucket{le="0.5"}') >= 1
    assert _value(text, 'lantern_explain_job_duration_seconds_bucket{le="5.0"}') >= 2
    assert _value(text, 'lantern_explain_job_duration_seconds_bucket{le="+Inf"}') >= 3
    assert _value(text, "lantern_explain_job_duration_seconds_count") >= 3
    per_image = 'lantern_explain_image_seconds_bucket{le="%s"}'  # 1.5 s per image, twice
    assert _value(text, per_image % "2.5") - _value(text, per_image % "1.0") >= 2


def test_status_reports_both_sides(keyed: Stack) -> None:
    response = httpx.get(keyed.url + "/status", headers=GOOD, timeout=10)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["predictions"]["ready"] is True
    assert body["predictions"]["model"].startswith("lantern-classifier:")
    assert body["predictions"]["provider"] == "CPUExecutionProvider"
    assert body["explanations"] == {
        "available": True,
        "redis": "ok",
        "workers": 1,
        "queue_depth": 0,
        "reason": None,
    }


# --- Redis down ---------------------------------------------------------------------------


@pytest.fixture
def outage(tiny_bundle, tmp_path: Path) -> Iterator[Stack]:  # type: ignore[no-untyped-def]
    """A keyed stack of this test's own, whose Redis the test stops."""
    running = start_stack(
        tiny_bundle.tag, tmp_path, server_env={"LANTERN_API_KEYS": ",".join(KEYS)}
    )
    yield running
    stop_stack(running)


def test_while_redis_is_down_finished_work_stays_readable(outage: Stack) -> None:
    keyed = outage
    finished = _finish_a_job(keyed)
    job_id = finished["job_id"]
    url = next(iter(finished["manifest"]["images"][0]["urls"].values()))
    unknown = "ex-" + "f" * 32
    keyed.redis.stop()

    started = time.monotonic()
    response = httpx.get(f"{keyed.url}/jobs/{job_id}", headers=GOOD, timeout=10)
    assert response.status_code == 200, response.text
    assert time.monotonic() - started < 2
    body = response.json()
    assert body["status"] == "finished" and body["manifest"] == finished["manifest"]
    artifact = httpx.get(keyed.url + url, headers=GOOD, timeout=10)
    assert artifact.status_code == 200 and artifact.content[:4] == b"\x89PNG"

    gone = httpx.get(f"{keyed.url}/jobs/{unknown}", headers=GOOD, timeout=10)
    assert gone.status_code == 503 and "redis" in gone.json()["error"].lower()

    started = time.monotonic()
    status = httpx.get(keyed.url + "/status", headers=GOOD, timeout=10)
    assert time.monotonic() - started < 2
    explanations = status.json()["explanations"]
    assert status.status_code == 200 and explanations["available"] is False
    assert explanations["redis"] == "unreachable" and "Redis" in explanations["reason"]
    assert status.json()["predictions"]["ready"] is True
    assert httpx.get(keyed.url + "/readyz", timeout=10).status_code == 200

    text = _metrics(keyed)
    assert _value(text, "lantern_explanations_available") == 0
    assert "lantern_explain_workers" not in text
    assert "bentoml_" in text  # the rest of /metrics is still there


def test_metrics_public_leaves_only_metrics_open(
    keyed: Stack,
    tiny_bundle,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    server = start_server(
        tiny_bundle.tag,
        tmp_path / "server.log",
        extra_env={
            "LANTERN_API_KEYS": KEYS[0],
            "LANTERN_METRICS_PUBLIC": "true",
            "REDIS_URL": keyed.redis.url,
            "LANTERN_QUEUE": keyed.env["LANTERN_QUEUE"],
        },
    )
    try:
        assert httpx.get(server.url + "/metrics", timeout=10).status_code == 200
        assert httpx.get(server.url + "/docs.json", timeout=10).status_code == 401
        assert httpx.get(server.url + "/status", timeout=10).status_code == 401
    finally:
        stop_server(server)
