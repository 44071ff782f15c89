"""The explanation worker: an RQ worker that keeps its model loaded between jobs.

RQ's default `Worker` forks a work horse per job, so every job would load the model
again, and CUDA does not survive a fork. `ExplainWorker` is a `SimpleWorker`: jobs run
in the worker process itself, next to the model loaded once at start.

Running in-process means no parent watches the job, so the worker proves it is alive
itself: while a job runs, a heartbeat thread renews the job's entry in RQ's
StartedJobRegistry every `worker_heartbeat_seconds`, with a lifetime of three beats. If
the process dies (SIGKILL, OOM killer, power), the entry lapses; within
`worker_maintenance_seconds` any live worker's maintenance (StartedJobRegistry.cleanup)
requeues the abandoned job while it has retries left, or fails it with
AbandonedJobError. Maintenance also deletes artifacts older than `job_ttl_seconds`.

SIGTERM or Ctrl+C: finish the current job, then stop (a second one stops at once; the
job is then failed and retried).

Only Lantern's job runs: queues, registries and the worker use `LanternJob`
(lantern.core.safe_job), so a job naming any other function, an instance or a callback is
failed with "refused: not a Lantern job (...)" before anything is imported or called,
and a job whose hash cannot even be read is failed the same way instead of stopping the
worker.

Redis outages do not stop a busy worker. Every Redis write around a job (its start,
progress, heartbeats, result or failure, the worker's own state) is retried with
exponential backoff for up to `redis_retry_seconds`, reconnecting each time; the job's
computation goes on meanwhile. If Redis stays away longer, the job's lease lapses and,
once Redis is back, maintenance retries or fails it with a reason: nothing is left
"started". Idle workers wait for Redis (RQ's own backoff) and resume.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from redis import Redis
from rq import SimpleWorker
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.registry import FailedJobRegistry
from rq.serializers import JSONSerializer
from rq.utils import current_timestamp, now, utcformat

from lantern.core.errors import LanternError
from lantern.core.job_metrics import record_job
from lantern.core.jobs import META_ERROR, META_REQUEST_ID, explain_queue
from lantern.core.logs import log_context, valid_request_id
from lantern.core.redis_retry import REDIS_ERRORS, retry_redis
from lantern.core.safe_job import LanternJob, refusal
from lantern.core.settings import Settings
from lantern.core.store import ArtifactStore, expire_artifacts, open_store
from models.network import resolve_device
from workers.context import WorkerContext, set_context
from workers.model_cache import ModelCache

log = logging.getLogger(__name__)

HEARTBEATS_BEFORE_ABANDONED = 3

T = TypeVar("T")


class ExplainWorker(SimpleWorker):
    def __init__(
        self,
        connection: Redis,
        settings: Settings,
        *,
        store: ArtifactStore | None = None,
        queues: list[Queue] | None = None,
        device: str | None = None,
        models: ModelCache | None = None,
        **kwargs: Any,
    ):
        if kwargs.pop("serializer", JSONSerializer) is not JSONSerializer:
            raise ValueError("explanation workers only speak RQ's JSONSerializer")
        self.settings = settings
        # The one context its jobs read (they run in this process, in this thread).
        self.context = WorkerContext(
            settings=settings,
            store=store if store is not None else open_store(settings),
            models=models or ModelCache(resolve_device(device or settings.device)),
        )
        set_context(self.context)
        self.store = self.context.store
        self._beat: _Heartbeat | None = None
        super().__init__(
            queues or [explain_queue(connection, settings)],
            connection=connection,
            serializer=JSONSerializer,
            job_class=LanternJob,
            maintenance_interval=settings.worker_maintenance_seconds,
            job_monitoring_interval=settings.worker_heartbeat_seconds,
            **kwargs,
        )

    def warm_up(self, model: str | None = None) -> None:
        """Load the model (once per process) and run a tiny pass; a missing model is
        logged, not fatal: jobs naming it will fail with the same readable reason."""
        try:
            loaded = self.context.models.warm_up(model or self.settings.model)
            self.log.info(
                "Worker %s: model %s ready on %s", self.name, loaded.bundle.tag, loaded.device
            )
        except LanternError as e:
            self.log.warning("Worker %s: no model loaded at start: %s", self.name, e)

    # --- liveness: short execution leases, renewed by a thread ----------------------------
    @property
    def dequeue_timeout(self) -> int:
        # Wake up for maintenance even when idle, so abandoned jobs are found promptly.
        return max(1, min(self.worker_ttl - 15, self.maintenance_interval))

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        return HEARTBEATS_BEFORE_ABANDONED * int(self.job_monitoring_interval)

    def execute_job(self, job: Job, queue: Queue) -> None:
        # Every line logged while the job runs (RQ's, the task's) names the job and the
        # HTTP request that enqueued it (job.meta, lantern.core.jobs.META_REQUEST_ID).
        with log_context(request_id=_request_id(job), job_id=job.id):
            execution = self._redis(
                "record the start of a job", lambda: self.prepare_execution(job)
            )
            self._job_started = time.monotonic()
            self._beat = _Heartbeat(self, job, execution, float(self.job_monitoring_interval))
            try:
                self.perform_job(job, queue, execution)
            finally:
                self._beat.stop()
                self._beat = None
        self.set_state("idle")

    def perform_job(self, job: Job, queue: Queue, execution: Execution) -> bool:
        reason = refusal(job)
        if reason is not None:
            # LanternJob.func raises RefusedJob, so RQ fails the job without calling
            # anything; retrying cannot make it a Lantern job.
            self.log.warning("Worker %s: job %s %s", self.name, job.id, reason)
            job.retries_left = 0
            job.meta = {META_ERROR: reason}
            self._redis("record the refusal of a job", job.save_meta)
        return bool(super().perform_job(job, queue, execution))

    # --- every Redis write around a job survives an outage ------------------------------
    def _redis(self, what: str, call: Callable[[], T]) -> T:
        return retry_redis(what, call, self.settings.redis_retry_seconds, self.log)

    def prepare_job_execution(self, job: Job, remove_from_intermediate_queue: bool = False) -> None:
        self._redis(
            "mark a job started",
            lambda: super(ExplainWorker, self).prepare_job_execution(
                job, remove_from_intermediate_queue
            ),
        )

    def handle_execution_ended(self, job: Job, queue: Queue, heartbeat_ttl: int) -> None:
        # Stop renewing before RQ records the outcome, so no renewal lands after it.
        if self._beat is not None:
            self._beat.stop()
        self._redis(
            "record the end of a job",
            lambda: super(ExplainWorker, self).handle_execution_ended(job, queue, heartbeat_ttl),
        )

    def handle_job_success(
        self, job: Job, queue: Queue, started_job_registry: Any, execution: Execution
    ) -> None:
        # One MULTI/EXEC transaction: repeating it after a dropped connection is safe.
        self._redis(
            "record a finished job",
            lambda: super(ExplainWorker, self).handle_job_success(
                job, queue, started_job_registry, execution
            ),
        )
        record_job(self.connection, self._elapsed(), _image_count(job), "finished")

    def handle_job_failure(self, job: Job, queue: Queue, *args: Any, **kwargs: Any) -> None:
        # RQ logs, and does not raise, when it cannot write the failure: wait for Redis
        # first so the failure (or the retry) is really recorded.
        self._redis("record a failed job", lambda: self.connection.ping())
        super().handle_job_failure(job, queue, *args, **kwargs)
        retried = job.get_status(refresh=False) != JobStatus.FAILED
        outcome = "retried" if retried else "failed"
        record_job(self.connection, self._elapsed(), _image_count(job), outcome)

    def _elapsed(self) -> float:
        return time.monotonic() - getattr(self, "_job_started", time.monotonic())

    def heartbeat(self, timeout: int | None = None, pipeline: Any = None) -> None:
        if pipeline is not None:
            super().heartbeat(timeout, pipeline)
            return
        self._redis(
            "send the worker heartbeat", lambda: super(ExplainWorker, self).heartbeat(timeout)
        )

    def set_state(self, state: str, pipeline: Any = None) -> None:
        if pipeline is not None:
            super().set_state(state, pipeline)
            return
        self._redis("record the worker state", lambda: super(ExplainWorker, self).set_state(state))

    def dequeue_job_and_maintain_ttl(
        self, timeout: int | None, max_idle_time: int | None = None
    ) -> tuple[Job, Queue] | None:
        while True:
            try:
                return super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)
            except REDIS_ERRORS:
                raise
            except Exception as e:  # a job hash RQ cannot read: fail it, keep working
                job_id = getattr(e, "job_id", None)
                queue = getattr(e, "queue", None)
                if job_id is None or queue is None:
                    raise
                self._refuse_unreadable(str(job_id), queue, e)

    def _refuse_unreadable(self, job_id: str, queue: Queue, error: Exception) -> None:
        reason = f"refused: not a Lantern job (its record cannot be read: {type(error).__name__})"
        self.log.warning("Worker %s: job %s %s", self.name, job_id, reason)
        failed = FailedJobRegistry(
            queue.name, self.connection, job_class=LanternJob, serializer=JSONSerializer
        )
        with self.connection.pipeline() as pipe:
            pipe.hset(
                LanternJob.key_for(job_id),
                mapping={
                    "status": JobStatus.FAILED.value,
                    "meta": json.dumps({META_ERROR: reason}),
                    "created_at": utcformat(now()),
                    "ended_at": utcformat(now()),
                },
            )
            pipe.zadd(failed.key, {job_id: current_timestamp() + self.settings.job_ttl_seconds})
            pipe.execute()

    def run_maintenance_tasks(self) -> None:
        super().run_maintenance_tasks()
        try:
            removed = expire_artifacts(self.store, self.settings)
            if removed:
                self.log.info("Worker %s: expired artifacts of %d job(s)", self.name, len(removed))
        except OSError:
            self.log.exception("Worker %s: artifact expiry failed", self.name)


def _request_id(job: Job) -> str | None:
    """The enqueuing request's id from the job's metadata, if it is a well-formed one."""
    try:
        value = (job.meta or {}).get(META_REQUEST_ID)
    except Exception:  # an unreadable record: refused later, logged without an id
        return None
    return valid_request_id(value) if isinstance(value, str) else None


def _image_count(job: Job) -> int:
    """Images in a job's payload (0 for a refused or unreadable one)."""
    try:
        return len(job.args[0]["images"])
    except Exception:
        return 0


class _Heartbeat:
    """A daemon thread renewing a running job's lease every `interval` seconds."""

    def __init__(self, worker: ExplainWorker, job: Job, execution: Execution, interval: float):
        self._worker, self._job, self._execution = worker, job, execution
        self._interval = max(0.2, interval)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job.id}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._worker.maintain_heartbeats(self._job, self._execution)
            except Exception:  # a Redis hiccup: try again next beat
                log.warning("heartbeat for job %s failed", self._job.id, exc_info=True)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
