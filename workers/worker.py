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
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from redis import Redis
from rq import SimpleWorker
from rq.executions import Execution
from rq.job import Job
from rq.queue import Queue
from rq.serializers import JSONSerializer

from lantern.errors import LanternError
from lantern.jobs import explain_queue
from lantern.settings import Settings, get_settings
from lantern.store import ArtifactStore, expire_artifacts, open_store

log = logging.getLogger(__name__)

HEARTBEATS_BEFORE_ABANDONED = 3


class ExplainWorker(SimpleWorker):
    def __init__(
        self,
        connection: Redis,
        settings: Settings | None = None,
        *,
        store: ArtifactStore | None = None,
        queues: list[Queue] | None = None,
        device: str | None = None,
        **kwargs: Any,
    ):
        from workers import tasks

        settings = settings or get_settings()
        tasks.configure(settings, device)  # the job function runs in this process
        if kwargs.pop("serializer", JSONSerializer) is not JSONSerializer:
            raise ValueError("explanation workers only speak RQ's JSONSerializer")
        self.settings = settings
        self.store = store if store is not None else open_store(settings)
        self._beat: _Heartbeat | None = None
        super().__init__(
            queues or [explain_queue(connection, settings)],
            connection=connection,
            serializer=JSONSerializer,
            maintenance_interval=settings.worker_maintenance_seconds,
            job_monitoring_interval=settings.worker_heartbeat_seconds,
            **kwargs,
        )

    def warm_up(self, model: str | None = None) -> None:
        """Load the model (once per process) and run a tiny pass; a missing model is
        logged, not fatal: jobs naming it will fail with the same readable reason."""
        from workers import tasks

        try:
            loaded = tasks.warm_up(model or self.settings.model)
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
        execution = self.prepare_execution(job)
        self._beat = _Heartbeat(self, job, execution, float(self.job_monitoring_interval))
        try:
            self.perform_job(job, queue, execution)
        finally:
            self._beat.stop()
            self._beat = None
        self.set_state("idle")

    def handle_execution_ended(self, job: Job, queue: Queue, heartbeat_ttl: int) -> None:
        # Stop renewing before RQ records the outcome, so no renewal lands after it.
        if self._beat is not None:
            self._beat.stop()
        super().handle_execution_ended(job, queue, heartbeat_ttl)

    def run_maintenance_tasks(self) -> None:
        super().run_maintenance_tasks()
        try:
            removed = expire_artifacts(self.store, self.settings)
            if removed:
                self.log.info("Worker %s: expired artifacts of %d job(s)", self.name, len(removed))
        except OSError:
            self.log.exception("Worker %s: artifact expiry failed", self.name)


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
