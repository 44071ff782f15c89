"""Memory soak: a real `lantern serve` keeps its RSS flat over 10,000 /predict requests.

The tiny model (ResNet-18, 64 px) and photo-like JPEGs of varied sizes (64x48 up to
1920x1080), 32 concurrent clients. Without the fixes in service/memory.py (BentoML's
uncancelled timeout timers kept every request's context alive for 300 s; glibc arenas per
decoding thread) the model worker grew 11-13 % between request 2,000 and 10,000.
"""

from __future__ import annotations

import pytest

from bench.soak import TARGET_GROWTH, make_jpegs, model_worker_pid, render, run_soak
from tests.service_fixtures import start_server, stop_server

pytestmark = pytest.mark.integration

REQUESTS = 10_000
CONCURRENCY = 32


@pytest.mark.timeout(600)
def test_worker_rss_grows_under_5_percent_from_request_2000_to_10000(tiny_bundle, tmp_path) -> None:
    server = start_server(tiny_bundle.tag, tmp_path / "serve.log")
    try:
        result = run_soak(
            server.url,
            server.process.pid,
            requests=REQUESTS,
            concurrency=CONCURRENCY,
            images=make_jpegs(),
        )
    finally:
        stop_server(server)
    report = render(result)
    print(report)
    worker = model_worker_pid(result)
    assert worker is not None, report
    assert result.errors == 0, report
    assert [s.done for s in result.samples] == [0, 2_000, 6_000, 10_000]
    assert result.growth(worker) < TARGET_GROWTH, report
