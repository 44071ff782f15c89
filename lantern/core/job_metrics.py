"""Explanation-side metrics kept in Redis: written by workers, read by the API at scrape time.

The API serves /metrics from its own process, so a Prometheus collector inside a worker
would never be seen there. Instead a worker, when a job ends, calls `record_job()`, which
adds the job to histogram bucket counters in two Redis hashes (one HINCRBY per field, in
one MULTI); the API reads them, with the queue, the RQ registries and the live workers,
in `read_explain_metrics()` when /metrics is scraped, and renders Prometheus text with
`render()`. Nothing is computed per request, and a scrape while Redis is down reports
`lantern_explanations_available 0` instead of failing. Torch-free.

    lantern:metrics:jobs           outcome counters: finished, failed, retried
    lantern:metrics:job_seconds    per-bucket counts ("le:<bound>", "le:+Inf"), sum, count
    lantern:metrics:image_seconds  the same for seconds per image (finished jobs)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from redis import Redis

    from lantern.core.settings import Settings

JOBS_KEY = "lantern:metrics:jobs"
JOB_SECONDS_KEY = "lantern:metrics:job_seconds"
IMAGE_SECONDS_KEY = "lantern:metrics:image_seconds"

OUTCOMES = ("finished", "failed", "retried")
JOB_SECONDS_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
IMAGE_SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
JOB_STATES = ("queued", "started", "finished", "failed")


def _bucket_field(value: float, buckets: Sequence[float]) -> str:
    """The field of the smallest bucket that holds `value` (counts are per bucket)."""
    for bound in buckets:
        if value <= bound:
            return f"le:{_fmt(bound)}"
    return "le:+Inf"


def _fmt(value: float) -> str:
    if math.isinf(value):
        return "+Inf"
    return repr(float(value)) if not float(value).is_integer() else f"{float(value):.1f}"


def record_job(connection: Redis, seconds: float | None, images: int, outcome: str) -> None:
    """Count one ended job attempt: `outcome` is "finished", "failed" (no retries left) or
    "retried" (it failed and RQ will run it again). `seconds` is the wall time of the
    attempt, None for an abandoned attempt nobody timed (its worker died): then only the
    outcome is counted. `images` is how many images it carried. Duration histograms
    count every timed outcome; seconds per image counts finished jobs only. Never raises:
    metrics must not fail a job (a Redis error here is ignored)."""
    if outcome not in OUTCOMES:
        raise ValueError(f"outcome {outcome!r} is not one of {', '.join(OUTCOMES)}")
    try:
        pipe = connection.pipeline(transaction=True)
        pipe.hincrby(JOBS_KEY, outcome, 1)
        if seconds is None:
            pipe.execute()
            return
        seconds = max(float(seconds), 0.0)
        pipe.hincrby(JOB_SECONDS_KEY, _bucket_field(seconds, JOB_SECONDS_BUCKETS), 1)
        pipe.hincrbyfloat(JOB_SECONDS_KEY, "sum", seconds)
        pipe.hincrby(JOB_SECONDS_KEY, "count", 1)
        if outcome == "finished" and images > 0:
            per_image = seconds / images
            pipe.hincrby(IMAGE_SECONDS_KEY, _bucket_field(per_image, IMAGE_SECONDS_BUCKETS), images)
            pipe.hincrbyfloat(IMAGE_SECONDS_KEY, "sum", seconds)
            pipe.hincrby(IMAGE_SECONDS_KEY, "count", images)
        pipe.execute()
    except Exception:  # best effort by design: metrics never fail a job
        pass


@dataclass
class ExplainMetrics:
    """What one scrape read from Redis; `available` is False when Redis could not be read."""

    available: bool
    reason: str | None = None
    queue_depth: int = 0
    jobs: dict[str, int] = field(default_factory=dict)
    workers: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    job_seconds: dict[str, float] = field(default_factory=dict)
    image_seconds: dict[str, float] = field(default_factory=dict)


def live_workers(connection: Redis, queue_name: str) -> int:
    """Workers registered for the queue whose own key has not expired (a killed worker
    stays in RQ's registration set until a cleanup; its heartbeat key expires)."""
    from rq.worker_registration import WORKERS_BY_QUEUE_KEY

    keys = list(cast("set[bytes]", connection.smembers(WORKERS_BY_QUEUE_KEY % queue_name)))
    if not keys:
        return 0
    pipe = connection.pipeline(transaction=False)
    for key in keys:
        pipe.exists(key)
    return sum(1 for alive in pipe.execute() if alive)


def read_explain_metrics(connection: Redis, settings: Settings) -> ExplainMetrics:
    """Everything /metrics shows about explanations, or `available=False` with a reason."""
    import redis
    from rq import Queue
    from rq.registry import FailedJobRegistry, FinishedJobRegistry, StartedJobRegistry

    try:
        queue = Queue(settings.queue, connection=connection)
        depth = int(queue.count)
        jobs = {
            "queued": depth,
            "started": StartedJobRegistry(queue=queue).get_job_count(cleanup=False),
            "finished": FinishedJobRegistry(queue=queue).get_job_count(cleanup=False),
            "failed": FailedJobRegistry(queue=queue).get_job_count(cleanup=False),
        }
        workers = live_workers(connection, settings.queue)
        pipe = connection.pipeline(transaction=False)
        for key in (JOBS_KEY, JOB_SECONDS_KEY, IMAGE_SECONDS_KEY):
            pipe.hgetall(key)
        outcomes, job_seconds, image_seconds = pipe.execute()
    except (redis.exceptions.RedisError, OSError) as e:
        return ExplainMetrics(available=False, reason=f"Redis is unreachable ({e})")
    return ExplainMetrics(
        available=True,
        queue_depth=depth,
        jobs=jobs,
        workers=workers,
        outcomes={o: int(outcomes.get(o.encode(), 0)) for o in OUTCOMES},
        job_seconds=_decode(job_seconds),
        image_seconds=_decode(image_seconds),
    )


def _decode(raw: dict[Any, Any]) -> dict[str, float]:
    return {(k.decode() if isinstance(k, bytes) else str(k)): float(v) for k, v in raw.items()}


def render(metrics: ExplainMetrics) -> str:
    """Prometheus text exposition of `metrics` (ends with a newline)."""
    lines = [
        "# HELP lantern_explanations_available Whether the API can read the explanation "
        "queue (Redis) right now.",
        "# TYPE lantern_explanations_available gauge",
        f"lantern_explanations_available {1 if metrics.available else 0}",
    ]
    if not metrics.available:
        return "\n".join(lines) + "\n"
    lines += [
        "# HELP lantern_explain_queue_depth Explanation jobs waiting in the queue.",
        "# TYPE lantern_explain_queue_depth gauge",
        f"lantern_explain_queue_depth {metrics.queue_depth}",
        "# HELP lantern_explain_jobs Explanation jobs by state (the queue and RQ's "
        "started, finished and failed registries).",
        "# TYPE lantern_explain_jobs gauge",
        *(f'lantern_explain_jobs{{status="{s}"}} {metrics.jobs.get(s, 0)}' for s in JOB_STATES),
        "# HELP lantern_explain_workers Live explanation workers listening on the queue.",
        "# TYPE lantern_explain_workers gauge",
        f"lantern_explain_workers {metrics.workers}",
        "# HELP lantern_explain_job_outcomes_total Ended job attempts by outcome "
        "(retried: failed and run again; failed: no retries left).",
        "# TYPE lantern_explain_job_outcomes_total counter",
        *(
            f'lantern_explain_job_outcomes_total{{outcome="{o}"}} {metrics.outcomes.get(o, 0)}'
            for o in OUTCOMES
        ),
    ]
    lines += _histogram(
        "lantern_explain_job_duration_seconds",
        "Wall time of one explanation job attempt, any outcome.",
        metrics.job_seconds,
        JOB_SECONDS_BUCKETS,
    )
    lines += _histogram(
        "lantern_explain_image_seconds",
        "Seconds per image of finished explanation jobs (job time / images).",
        metrics.image_seconds,
        IMAGE_SECONDS_BUCKETS,
    )
    return "\n".join(lines) + "\n"


def _histogram(
    name: str, help_text: str, raw: dict[str, float], buckets: Sequence[float]
) -> list[str]:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
    cumulative = 0.0
    for bound in (*buckets, math.inf):
        label = _fmt(bound)
        cumulative += raw.get(f"le:{label}", 0.0)
        lines.append(f'{name}_bucket{{le="{label}"}} {int(cumulative)}')
    lines.append(f"{name}_sum {raw.get('sum', 0.0)!r}")
    lines.append(f"{name}_count {int(raw.get('count', 0.0))}")
    return lines
