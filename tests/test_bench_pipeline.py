"""bench.pipeline drives the service's own prediction path, without HTTP, and counts it."""

from __future__ import annotations

from typing import Any

from bench.pipeline import run_in_subprocess
from bench.predict_ratio import SIDES, rotated
from service.metrics import CPU_STAGES


def test_the_pipeline_runs_every_request_through_the_service_and_counts_its_cpu(
    tiny_bundle: Any,
) -> None:
    run = run_in_subprocess(tiny_bundle.tag, "fp32", concurrency=4, requests=12, timeout_s=300)
    assert run.requests == 12
    # The answers came from the service's predict_uploads: they name the graph it served.
    assert run.precisions == ["fp32"]
    assert run.throughput > 0
    stages = run.stage_cpu_ms
    assert set(stages) == {*CPU_STAGES, "worker"}, stages
    for stage in ("decode", "preprocess", "model"):
        assert stages[stage] > 0, (stage, stages)
    # The stages are part of what the process spent, and the process's own clock saw it
    # all (its window starts a little later than the counter's: 1 ms per image of slack).
    assert sum(stages[s] for s in CPU_STAGES) <= stages["worker"] + 1e-6, stages
    assert stages["worker"] <= run.cpu_ms + 1.0, (stages, run.cpu_ms)


def test_each_side_of_a_round_goes_first_in_turn() -> None:
    orders = [rotated(SIDES, r) for r in range(4)]
    assert orders[:3] == [
        ("raw", "pipeline", "service"),
        ("pipeline", "service", "raw"),
        ("service", "raw", "pipeline"),
    ]
    assert orders[3] == orders[0]
