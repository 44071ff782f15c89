"""The whole system as real processes on loopback: its own redis-server, a `lantern worker`
and a `lantern serve`, wired together the way `lantern up` wires them."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import RedisServer, start_redis
from tests.service_fixtures import Server, start_server, stop_server
from tests.worker_fixtures import start_worker, stop_processes, wait_for, worker_env


@dataclass
class Stack:
    redis: RedisServer
    worker: subprocess.Popen[bytes]
    server: Server
    artifact_dir: Path
    env: dict[str, str]

    @property
    def url(self) -> str:
        return self.server.url


def start_stack(
    tag: str,
    tmp: Path,
    server_env: dict[str, str] | None = None,
    env: dict[str, str] | None = None,
    worker_only_env: dict[str, str] | None = None,
) -> Stack:
    """`server_env`: more environment for `lantern serve` only (e.g. LANTERN_API_KEYS);
    `env`: for both the worker and the server (e.g. LANTERN_LOG_FORMAT); `worker_only_env`:
    for the worker only (e.g. a BENTOML_HOME of its own)."""
    redis = start_redis(tmp / "redis")
    artifacts = tmp / "artifacts"
    common = env or {}
    env = worker_env(redis.url, artifacts, tag, **common)
    worker = start_worker({**env, **(worker_only_env or {})}, tmp / "worker.log")
    shared = {k: env[k] for k in ("REDIS_URL", "LANTERN_ARTIFACT_DIR", "LANTERN_QUEUE")}
    shared.update(common)
    server = start_server(tag, tmp / "server.log", extra_env={**shared, **(server_env or {})})
    _wait_for_worker(redis.url, worker, tmp / "worker.log")
    return Stack(redis, worker, server, artifacts, env)


def _wait_for_worker(url: str, worker: subprocess.Popen[bytes], log: Path) -> None:
    """Until the worker has registered itself in Redis (on a loaded machine it can start
    after the server is ready)."""
    import redis as redis_client
    from rq import Worker

    connection = redis_client.Redis.from_url(url)
    try:
        wait_for(
            lambda: worker.poll() is not None or Worker.count(connection=connection) > 0,
            120,
            "the worker to register in Redis",
        )
    finally:
        connection.close()
    assert worker.poll() is None, log.read_text(errors="replace")[-3000:]


def stop_stack(stack: Stack) -> None:
    stop_server(stack.server)
    stop_processes([stack.worker])
    stack.redis.stop()


@pytest.fixture(scope="module")
def stack(tiny_bundle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:  # type: ignore[no-untyped-def]
    running = start_stack(tiny_bundle.tag, tmp_path_factory.mktemp("stack"))
    yield running
    stop_stack(running)
