"""service.metrics' CPU counters in this process (the served ones: tests/test_service_server.py)."""

from __future__ import annotations

import threading
import time

import prometheus_client
import pytest

from service.metrics import WorkerCpu, record_cpu


def event_loop_seconds() -> float:
    value = prometheus_client.REGISTRY.get_sample_value(
        "lantern_cpu_seconds_total", {"stage": "event_loop"}
    )
    return value or 0.0


def burn(seconds: float) -> None:
    """Spend `seconds` of this thread's CPU."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_a_reading_counts_the_cpu_its_thread_spent_since_the_last_one() -> None:
    meter = WorkerCpu()
    meter.record()  # the baseline
    start = event_loop_seconds()
    burn(0.05)
    meter.record()
    assert event_loop_seconds() - start >= 0.05


def test_a_reading_from_another_thread_starts_a_baseline_instead_of_mixing_two_clocks() -> None:
    meter = WorkerCpu()
    burn(0.05)  # this thread's clock runs ahead of the other thread's
    meter.record()
    start = event_loop_seconds()
    other = threading.Thread(target=meter.record)
    other.start()
    other.join()
    meter.record()  # back on this thread: another new baseline
    assert event_loop_seconds() == start


def test_an_unknown_stage_is_refused() -> None:
    with pytest.raises(ValueError, match="stage must be one of"):
        record_cpu("resize", 0.1)
