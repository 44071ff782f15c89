"""`LanternJob`: an RQ job that can only ever call Lantern's explain task. Torch-free.

RQ's JSON serializer keeps pickle out, but a JSON job still names the function to run
(`func_name`), an object to call it on (`instance`) and callbacks (`on_success`,
`on_failure`, `on_stopped`), and RQ imports and calls whatever is named. Anybody who can
write to Redis could write a job naming `os.system`. So every queue, registry and worker
of Lantern uses this job class, which checks the job against an allow-list before RQ
resolves any name:

    func_name   exactly lantern.core.jobs.JOB_FUNCTION, no instance
    arguments   one JSON object (the ExplainRequest payload), no keyword arguments
    callbacks   none (Lantern sets none)

A job that fails the check is refused: `func` raises `RefusedJob` (nothing is imported,
nothing is called), the worker records "refused: not a Lantern job (...)" in the job's
meta and fails it without retries. Callback names are never resolved, so the failure
path cannot be used to call a function either. A payload that is not JSON (pickle) fails
to deserialise before any of this and is refused the same way.
"""

from __future__ import annotations

from typing import Any

from rq.job import Job

from lantern.core.errors import JobError
from lantern.core.jobs import JOB_FUNCTION


class RefusedJob(JobError):
    """A job that is not a Lantern explain job; it is failed, never run."""


def refusal(job: Job) -> str | None:
    """Why `job` must not run, or None for a well-formed Lantern job. Imports nothing."""
    try:
        func_name, instance = job.func_name, job.instance
        args, kwargs = job.args, job.kwargs
    except Exception as e:  # DeserializationError: not JSON (pickle), or malformed
        return f"refused: not a Lantern job (its payload is not readable JSON: {type(e).__name__})"
    if func_name != JOB_FUNCTION or instance is not None:
        return f"refused: not a Lantern job (it names {str(func_name)[:120]!r})"
    if kwargs or len(args) != 1 or not isinstance(args[0], dict):
        return "refused: not a Lantern job (explain takes one JSON object and nothing else)"
    callbacks = [
        name
        for name in (
            job._success_callback_name,
            job._failure_callback_name,
            job._stopped_callback_name,
        )
        if name
    ]
    if callbacks:
        return f"refused: not a Lantern job (it names callbacks {callbacks!r})"
    return None


class LanternJob(Job):
    """An RQ job that resolves only the allow-listed explain task (see the module doc)."""

    @property
    def func(self) -> Any:
        reason = refusal(self)
        if reason is not None:
            raise RefusedJob(reason)
        return super().func

    # Callbacks are never resolved by name: Lantern enqueues none, and a forged one must
    # not run on the failure path of a refused job.
    @property
    def success_callback(self) -> None:
        return None

    @property
    def failure_callback(self) -> None:
        return None

    @property
    def stopped_callback(self) -> None:
        return None
