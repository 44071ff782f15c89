"""The routes' dependencies run on the event loop, not in FastAPI's thread pool.

FastAPI runs a plain `def` dependency in its thread pool: a hand-off to a worker thread
and back on every request that uses it. Every route of the API uses `CurrentService`, so
a sync dependency costs every request a thread round trip (BENCHMARKS.md, "A cheaper
model").
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import Any

from fastapi.routing import APIRoute

from service.api import app


def _dependencies(dependant: Any) -> Iterator[Any]:
    for sub in dependant.dependencies:
        yield sub
        yield from _dependencies(sub)


def test_every_route_dependency_is_a_coroutine_function() -> None:
    routes = [r for r in app.routes if isinstance(r, APIRoute)]
    assert any(r.path == "/predict" for r in routes)
    checked = 0
    for route in routes:
        for dep in _dependencies(route.dependant):
            if dep.call is None:  # a parameter (query, path, Request), not a function
                continue
            assert inspect.iscoroutinefunction(dep.call), (
                f"{route.path}: dependency {dep.call.__qualname__} is a plain def, which "
                "FastAPI runs in its thread pool on every request"
            )
            checked += 1
    assert checked >= len(routes) // 2  # CurrentService is used by most routes
