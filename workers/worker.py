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

SIGTERM or Ctrl+C: finish the current job, then stop (a second one, more than a second
later, stops at once: RQ ignores a repeat within a second; the job is then retried).

Only Lantern's job runs: queues, registries and the worker use `LanternJob`
(lantern.core.safe_job), so a job naming any other function, an instance or a callback is
failed with "refused: not a Lantern job (...)" before anything is imported or called,
and a job whose hash cannot even be read is failed the same way instead of stopping the
worker.

Jobs are explained in groups. After RQ hands the worker a job, the worker looks at the
next jobs waiting in the queue (a window of 2 x `explain_group_jobs`) and claims those for
the same model tag, layers and methods, up to `explain_group_jobs` jobs and
`max_images_per_job` images in all, with one Lua script that moves each from the queue to
RQ's intermediate queue only if it is still there, exactly as RQ's own dequeue moves a job
(LMOVE), so two workers never claim the same job. Every job of the group is then marked
started at once (an Execution in StartedJobRegistry, status "started", this worker's
name), and the heartbeat thread renews all their leases: a worker killed mid-group leaves
each unfinished job to maintenance, which retries or fails it, like a single job. The
images of all the jobs are explained in one chunked pass (workers.tasks.prepare_group),
and then each job runs as the ordinary allow-listed `workers.tasks.explain` job through
RQ's own perform/success/failure path, taking its share of the pass: its own artifacts,
progress, manifest, result and failure. A job with a bad payload or image is left out
of the pass and fails alone with its own reason; if the pass itself fails, every job runs
alone. job.meta["group"] records, for a job explained with others, how many jobs and
images the pass held.

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
from rq.exceptions import AbandonedJobError
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.registry import FailedJobRegistry
from rq.serializers import JSONSerializer
from rq.timeouts import JobTimeoutException
from rq.utils import as_text, current_timestamp, now, utcformat

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
from workers.tasks import group_key, payload_images, prepare_group

log = logging.getLogger(__name__)

HEARTBEATS_BEFORE_ABANDONED = 3
META_GROUP = "group"  # job.meta of a job explained with others: {"jobs", "images"}
GROUP_WINDOW = 2  # queued jobs looked at for a group: GROUP_WINDOW x explain_group_jobs

# Move each named job from the queue (KEYS[1]) to RQ's intermediate queue (KEYS[2]) if it
# is still queued; return the ones moved. Atomic: a job another worker took is skipped.
_CLAIM = """
local claimed = {}
for _, id in ipairs(ARGV) do
  if redis.call('LREM', KEYS[1], 1, id) == 1 then
    redis.call('RPUSH', KEYS[2], id)
    claimed[#claimed + 1] = id
  end
end
return claimed
"""

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
        self._group_started: set[str] = set()  # jobs of the group already marked started
        self._claim = connection.register_script(_CLAIM)
        super().__init__(
            queues or [explain_queue(connection, settings)],
            connection=connection,
            serializer=JSONSerializer,
            job_class=LanternJob,
            maintenance_interval=settings.worker_maintenance_seconds,
            job_monitoring_interval=settings.worker_heartbeat_seconds,
            **kwargs,
        )
        self.push_exc_handler(_count_abandoned)

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
        group = self._claim_group(job, queue)
        if len(group) > 1:
            self._execute_group(group, queue)
            self.set_state("idle")
            return
        # Every line logged while the job runs (RQ's, the task's) names the job and the
        # HTTP request that enqueued it (job.meta, lantern.core.jobs.META_REQUEST_ID).
        with log_context(request_id=_request_id(job), job_id=job.id):
            execution = self._redis(
                "record the start of a job", lambda: self.prepare_execution(job)
            )
            self._job_started = time.monotonic()
            self._beat = _Heartbeat(self, job.id, float(self.job_monitoring_interval))
            self._beat.add(job, execution)
            try:
                self.perform_job(job, queue, execution)
            finally:
                self._beat.stop()
                self._beat = None
        self.set_state("idle")

    # --- groups: queued jobs for the same model, layers and methods, explained together ---
    def _claim_group(self, job: Job, queue: Queue) -> list[Job]:
        """`job` and the queued jobs claimed to be explained with it (see the module doc)."""
        limit = self.settings.explain_group_jobs
        if limit <= 1 or len(self.queues) != 1 or refusal(job) is not None:
            return [job]
        key = group_key(job.args[0])
        images, budget = payload_images(job.args[0]), self.settings.max_images_per_job
        if key is None or images >= budget:
            return [job]
        chosen: list[Job] = []
        try:
            for other in self._queued_jobs(queue, GROUP_WINDOW * limit):
                if other.id == job.id or refusal(other) is not None:
                    continue
                payload = other.args[0]
                n = payload_images(payload)
                if group_key(payload) != key or n < 1 or images + n > budget:
                    continue
                chosen.append(other)
                images += n
                if len(chosen) + 1 >= limit:
                    break
            if not chosen:
                return [job]
            keys = [queue.key, queue.intermediate_queue_key]
            claimed = {as_text(i) for i in self._claim(keys=keys, args=[j.id for j in chosen])}
        except REDIS_ERRORS:
            # Jobs the script may have moved before the reply was lost wait in RQ's
            # intermediate queue, whose maintenance retries or fails them.
            self.log.warning("Worker %s: could not claim a group; running one job", self.name)
            return [job]
        group = [job, *(j for j in chosen if j.id in claimed)]
        for member in group[1:]:
            member.redis_server_version = job.redis_server_version
        return group

    def _queued_jobs(self, queue: Queue, window: int) -> list[Job]:
        """The first `window` jobs waiting in `queue` that can be read and are queued."""
        window_ids: Any = self.connection.lrange(queue.key, 0, window - 1)
        ids = [as_text(i) for i in window_ids]
        with self.connection.pipeline() as pipe:
            for job_id in ids:
                pipe.hgetall(LanternJob.key_for(job_id))
            records = pipe.execute()
        jobs: list[Job] = []
        for job_id, record in zip(ids, records, strict=True):
            if not record:
                continue
            candidate = LanternJob(job_id, connection=self.connection, serializer=JSONSerializer)
            try:
                candidate.restore(record)
            except Exception:  # unreadable: RQ's own dequeue refuses it later
                continue
            if candidate.get_status(refresh=False) == JobStatus.QUEUED:
                jobs.append(candidate)
        return jobs

    def _execute_group(self, group: list[Job], queue: Queue) -> None:
        """Mark every job started (leases renewed by one heartbeat thread), explain all
        their images in one pass, then run each job through RQ's own path."""
        beat = _Heartbeat(self, group[0].id, float(self.job_monitoring_interval))
        self._beat = beat
        try:
            executions: list[Execution] = []
            for job in group:
                with log_context(request_id=_request_id(job), job_id=job.id):
                    execution = self._redis("record the start of a job", _starter(self, job))
                    beat.add(job, execution)
                    self.prepare_job_execution(job, remove_from_intermediate_queue=True)
                    self._group_started.add(job.id)
                    executions.append(execution)
            self.log.info(
                "Worker %s: explaining %d jobs together: %s",
                self.name,
                len(group),
                ", ".join(j.id for j in group),
            )
            started = time.monotonic()
            shares = self._prepare_group(group)
            shared = time.monotonic() - started
            for job, execution in zip(group, executions, strict=True):
                with log_context(request_id=_request_id(job), job_id=job.id):
                    # The attempt's time: its own rendering plus its share of the pass.
                    self._job_started = time.monotonic() - shared * shares.get(job.id, 0.0)
                    self.perform_job(job, queue, execution)
        finally:
            beat.stop()
            self._beat = None
            self._group_started.clear()
            self.context.prepared.clear()

    def _prepare_group(self, group: list[Job]) -> dict[str, float]:
        """Run the group's shared pass into the context; each job's share of its images."""
        timeout = min(j.timeout or self.queue_class.DEFAULT_TIMEOUT for j in group)
        try:
            with self.death_penalty_class(timeout, JobTimeoutException, job_id=group[0].id):
                prepared = prepare_group([(j.id, j.args[0]) for j in group], self.context)
        except Exception:  # e.g. out of memory: each job runs alone instead
            self.log.warning(
                "Worker %s: the group's pass failed; jobs run alone", self.name, exc_info=True
            )
            return {}
        self.context.prepared.update(prepared)
        images = {j: len(p.originals) for j, p in prepared.items()}
        total = sum(images.values())
        for job in group:
            if job.id in prepared and len(prepared) > 1:
                job.meta[META_GROUP] = {"jobs": len(prepared), "images": total}
                self._redis("record a job's group", job.save_meta)
        return {j: n / total for j, n in images.items()} if total else {}

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
        if job.id in self._group_started:
            return  # marked started with its group (_execute_group)
        self._redis(
            "mark a job started",
            lambda: super(ExplainWorker, self).prepare_job_execution(
                job, remove_from_intermediate_queue
            ),
        )

    def handle_execution_ended(self, job: Job, queue: Queue, heartbeat_ttl: int) -> None:
        # Stop renewing before RQ records the outcome, so no renewal lands after it.
        if self._beat is not None:
            self._beat.discard(job.id)
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

    @property
    def key_ttl(self) -> int:
        """Lifetime of the worker's own Redis key, renewed at every heartbeat: three of
        its longest gaps between renewals (a job's heartbeat, or an idle dequeue wait).

        RQ's own (worker_ttl + 60, 480 s idle; heartbeat + 60 busy) kept a SIGKILLed
        worker counted live (/status `workers`, lantern_explain_workers) for 8 minutes.
        """
        gap = max(int(self.job_monitoring_interval), self.dequeue_timeout)
        return HEARTBEATS_BEFORE_ABANDONED * gap

    def heartbeat(self, timeout: int | None = None, pipeline: Any = None) -> None:
        timeout = self.key_ttl  # RQ asks for its own lifetimes, busy or idle
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


def _count_abandoned(job: Job, exc_type: type, *_exc: Any) -> None:
    """Count an abandoned attempt (its worker died, or lost Redis past redis_retry_seconds)
    in the job outcomes, as RQ's StartedJobRegistry.cleanup is about to retry or fail it.

    RQ's maintenance calls the worker's exception handlers for each abandoned job, just
    before it decides, by the same test, whether to retry it; only one worker at a time
    runs it (RQ's maintenance lock), so an attempt is counted once. Nobody timed the
    attempt, so it counts an outcome and no duration. The other exceptions reaching
    this chain are the worker's own jobs' failures, which handle_job_failure counts.
    """
    if exc_type is not AbandonedJobError:
        return
    retried = bool(job.retries_left and job.retries_left > 0)
    record_job(job.connection, None, _image_count(job), "retried" if retried else "failed")


def _starter(worker: ExplainWorker, job: Job) -> Callable[[], Execution]:
    return lambda: worker.prepare_execution(job)


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
    """A daemon thread renewing the leases of running jobs (one, or a group's) every
    `interval` seconds. `discard(job_id)` returns only when no renewal of that job is in
    flight, and none starts after it."""

    def __init__(self, worker: ExplainWorker, name: str, interval: float):
        self._worker = worker
        self._jobs: dict[str, tuple[Job, Execution]] = {}
        self._lock = threading.Lock()
        self._interval = max(0.2, interval)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{name}", daemon=True)
        self._thread.start()

    def add(self, job: Job, execution: Execution) -> None:
        with self._lock:
            self._jobs[job.id] = (job, execution)

    def discard(self, job_id: str) -> None:
        with self._lock:
            self._jobs.pop(job_id, None)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            for job_id in list(self._jobs):
                with self._lock:
                    entry = self._jobs.get(job_id)
                    if entry is None or self._stop.is_set():
                        continue
                    try:
                        self._worker.maintain_heartbeats(*entry)
                    except REDIS_ERRORS as e:  # an outage: one line a beat, not a traceback
                        log.warning(
                            "heartbeat for job %s failed: Redis unreachable (%s)", job_id, e
                        )
                    except Exception:  # anything else is worth its traceback; next beat
                        log.warning("heartbeat for job %s failed", job_id, exc_info=True)

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            self._jobs.clear()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
