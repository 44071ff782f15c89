"""bench.predict reads the service's CPU counters off /metrics text as Prometheus writes it."""

from __future__ import annotations

import prometheus_client

from bench.predict import cpu_counters, describe_stages


def metrics_text() -> str:
    registry = prometheus_client.CollectorRegistry()
    stages = prometheus_client.Counter(
        "lantern_cpu_seconds", "by stage", labelnames=["stage"], registry=registry
    )
    for stage, seconds in (("event_loop", 0.5), ("decode", 0.25), ("preprocess", 1.0)):
        stages.labels(stage).inc(seconds)
    stages.labels("model").inc(12.0)
    prometheus_client.Counter("lantern_worker_cpu_seconds", "all", registry=registry).inc(14.5)
    return prometheus_client.generate_latest(registry).decode()


def test_the_counters_are_read_by_stage_with_the_worker_beside_them() -> None:
    assert cpu_counters(metrics_text()) == {
        "event_loop": 0.5,
        "decode": 0.25,
        "preprocess": 1.0,
        "model": 12.0,
        "worker": 14.5,
    }


def test_what_the_stages_leave_out_is_the_worker_minus_their_sum() -> None:
    line = describe_stages(
        {"event_loop": 0.5, "decode": 0.25, "preprocess": 1.0, "model": 12.0, "worker": 14.5}
    )
    assert line == "event loop 0.5, decode 0.2, preprocess 1.0, model 12.0, outside 0.8 ms"
