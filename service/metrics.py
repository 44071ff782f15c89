"""Lantern's own Prometheus metrics, served by BentoML on /metrics next to its own.

Created on first use, after BentoML has set PROMETHEUS_MULTIPROC_DIR for the worker, so
they are written to the multiprocess directory that /metrics aggregates.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from lantern.core.bundle import Bundle

BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
QUEUE_WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

_metrics: dict[str, Any] = {}


def record_model_info(
    bundle: Bundle, precision: str = "fp32", runtime: str = "onnxruntime"
) -> None:
    """Expose the served model version on /metrics as
    lantern_model_info{model,version,architecture,precision,runtime} 1 (precision: the
    graph that answers, fp32, int8 or fp16; runtime: onnxruntime or openvino)."""
    import prometheus_client

    if "model_info" not in _metrics:
        _metrics["model_info"] = prometheus_client.Gauge(
            "lantern_model_info",
            "The model version this Lantern API process serves (value is always 1).",
            labelnames=["model", "version", "architecture", "precision", "runtime"],
            multiprocess_mode="max",
        )
    name = bundle.tag.split(":", 1)[0]
    info = _metrics["model_info"].labels(
        name, bundle.version, bundle.architecture, precision, runtime
    )
    info.set(1)


def declare_metrics() -> None:
    """Create the prediction metrics now, at 0, so /metrics shows every series from the
    start rather than only after the first prediction (a rate over an absent series is
    no rate at all)."""
    _batch_metrics()
    _cpu_metrics()
    _worker_cpu()


def record_batch(images: int, queue_waits_s: list[float]) -> None:
    """One model call: lantern_batch_size (images), lantern_queue_wait_seconds (per request)."""
    batch_size, queue_wait = _batch_metrics()
    batch_size.observe(images)
    for wait in queue_waits_s:
        queue_wait.observe(wait)


def _batch_metrics() -> tuple[Any, Any]:
    if "batch_size" not in _metrics:
        import prometheus_client

        _metrics["batch_size"] = prometheus_client.Histogram(
            "lantern_batch_size",
            "Images per model call (concurrent requests are batched together).",
            buckets=BATCH_SIZE_BUCKETS,
        )
        _metrics["queue_wait"] = prometheus_client.Histogram(
            "lantern_queue_wait_seconds",
            "How long a request waited for the model before its batch started.",
            buckets=QUEUE_WAIT_BUCKETS,
        )
    return _metrics["batch_size"], _metrics["queue_wait"]


# What a prediction costs the API worker's CPU, stage by stage: an operator divides by the
# images run (lantern_batch_size_sum) to see, on their own hardware, what an image costs
# beyond the model and so how close the service can come to its runtime (BENCHMARKS.md).
CPU_STAGES = ("event_loop", "decode", "preprocess", "model")


def record_cpu(stage: str, seconds: float) -> None:
    """Add `seconds` of CPU to lantern_cpu_seconds_total{stage} (one of CPU_STAGES)."""
    if stage not in CPU_STAGES:
        raise ValueError(f"stage must be one of {', '.join(CPU_STAGES)}, not {stage!r}")
    _cpu_metrics()[stage].inc(seconds)


def _cpu_metrics() -> dict[str, Any]:
    if "cpu" not in _metrics:
        import prometheus_client

        counter = prometheus_client.Counter(
            "lantern_cpu_seconds",
            "CPU the API worker spent on predictions, by stage: event_loop (the thread that "
            "runs HTTP, middleware, multipart parsing, JSON and batching), decode, "
            "preprocess, model (the threads that call the model; the own threads of the "
            "session that runs a lone request on every core are not counted).",
            labelnames=["stage"],
        )
        _metrics["cpu"] = {name: counter.labels(name) for name in CPU_STAGES}
    return _metrics["cpu"]


class WorkerCpu:
    """Records, from the event loop's thread, the CPU that thread and the whole worker
    process have used since the previous reading: lantern_cpu_seconds_total{stage=
    "event_loop"} and lantern_worker_cpu_seconds_total (every thread of the process, so
    what the stages leave out is the difference). The first reading only sets the
    baseline: model loading and warm-up are not a prediction's cost."""

    def __init__(self) -> None:
        self._thread: int | None = None
        self._loop = 0.0
        self._process = 0.0

    def record(self) -> None:
        now_loop, now_process = time.thread_time(), time.process_time()
        thread = threading.get_ident()
        if self._thread == thread:
            record_cpu("event_loop", now_loop - self._loop)
            _worker_cpu().inc(now_process - self._process)
        # A reading from any other thread would subtract two threads' clocks; it starts
        # a new baseline instead (called from the event loop only, that never happens).
        self._thread, self._loop, self._process = thread, now_loop, now_process


def _worker_cpu() -> Any:
    if "worker_cpu" not in _metrics:
        import prometheus_client

        _metrics["worker_cpu"] = prometheus_client.Counter(
            "lantern_worker_cpu_seconds",
            "CPU of every thread of the API worker process while it served predictions "
            "(lantern_cpu_seconds_total gives the stages within it).",
        )
    return _metrics["worker_cpu"]
