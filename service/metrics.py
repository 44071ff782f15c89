"""Lantern's own Prometheus metrics, served by BentoML on /metrics next to its own.

Created on first use, after BentoML has set PROMETHEUS_MULTIPROC_DIR for the worker, so
they are written to the multiprocess directory that /metrics aggregates.
"""

from __future__ import annotations

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


def record_batch(images: int, queue_waits_s: list[float]) -> None:
    """One model call: lantern_batch_size (images), lantern_queue_wait_seconds (per request)."""
    import prometheus_client

    if "batch_size" not in _metrics:
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
    _metrics["batch_size"].observe(images)
    for wait in queue_waits_s:
        _metrics["queue_wait"].observe(wait)
