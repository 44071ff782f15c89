"""What a job needs from the worker that runs it: one object, handed over explicitly.

RQ calls the job function by name with the JSON payload only, so the worker cannot pass
arguments of its own. It builds one `WorkerContext` (its settings, artifact store, device
and model cache) and makes it current for the thread that runs its jobs; the job reads
`current_context()` and nothing else.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from lantern.core.errors import JobError
from lantern.core.settings import Settings
from lantern.core.store import ArtifactStore
from workers.model_cache import ModelCache


@dataclass(frozen=True)
class WorkerContext:
    settings: Settings
    store: ArtifactStore
    models: ModelCache
    # Work the worker computed for a group of jobs at once (workers.tasks.prepare_group),
    # by job id; each job's explain() takes its own entry, the worker clears the rest.
    prepared: dict[str, Any] = field(default_factory=dict)


_current: ContextVar[WorkerContext] = ContextVar("lantern_worker_context")


def set_context(context: WorkerContext) -> None:
    """Make `context` the one this thread's jobs read (the worker does, at start)."""
    _current.set(context)


def current_context() -> WorkerContext:
    try:
        return _current.get()
    except LookupError:
        raise JobError(
            "no worker context: explanation jobs run inside `lantern worker` (ExplainWorker)"
        ) from None
