"""Shared fixtures: an isolated BentoML home, a real redis-server, a registered tiny model.

Every test session gets its own BENTOML_HOME (set before bentoml is imported anywhere) so
tests never touch a developer's model store.
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from lantern import redis_server as lantern_redis

_SESSION_HOME = Path(tempfile.mkdtemp(prefix="lantern-tests-"))
os.environ["BENTOML_HOME"] = str(_SESSION_HOME / "bentoml")
os.environ["BENTOML_DO_NOT_TRACK"] = "true"
os.environ.setdefault("TORCH_HOME", str(_SESSION_HOME / "torch"))
# No test may reach the network: the hub, PyPI or anywhere else.
os.environ["HF_HUB_OFFLINE"] = "1"

TINY_ARCH = "resnet18"
TINY_SIZE = 64
TINY_CLASSES = ["circle", "square", "triangle", "cross"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RedisServer:
    url: str
    port: int
    process: subprocess.Popen[bytes]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


@dataclass
class PersistentRedis:
    """A password-protected redis-server with an append-only file (as `lantern up` runs
    it) that a test can kill and start again on the same port and data."""

    data: Path
    password: str
    appendfsync: str = "everysec"
    port: int = field(default_factory=lambda: free_port())
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = lantern_redis.start_redis(
            self.port, self.data, persist=True, password=self.password, appendfsync=self.appendfsync
        )

    def kill(self) -> None:
        """SIGKILL it, if it runs: an outage, or a test's cleanup."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


def start_redis(tmp: Path) -> RedisServer:
    """A throw-away redis-server (no persistence) on a free loopback port."""
    port = free_port()
    proc = lantern_redis.start_redis(port, tmp, persist=False)
    return RedisServer(url=f"redis://127.0.0.1:{port}/0", port=port, process=proc)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real redis-server on a free loopback port, for the whole session."""
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def redis_conn(redis_server: RedisServer) -> Iterator[object]:
    """A client to the session's Redis, flushed before and after each test."""
    import redis

    conn = redis.Redis.from_url(redis_server.url)
    conn.flushall()
    yield conn
    conn.flushall()
    conn.close()


@pytest.fixture
def worker_processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Worker processes a test starts; any still running are killed afterwards."""
    from tests.worker_fixtures import stop_processes

    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    stop_processes(procs)


def register_tiny(
    directory: Path,
    model: Any = None,
    *,
    seed: int = 0,
    name: str = "lantern-classifier",
    accuracy: float = 0.25,
) -> Any:
    """Register `model` (default: a ResNet-18 with random weights from `seed`) for the 4
    shape classes at 64 px as a new version of `name`; its bundle."""
    import torch

    from lantern.core.preprocess import PreprocessSpec
    from models.checkpoint import save_checkpoint
    from models.export import export_checkpoint
    from models.network import build_model

    if model is None:
        torch.manual_seed(seed)
        model = build_model(TINY_ARCH, len(TINY_CLASSES), weights="none")
    ckpt = save_checkpoint(
        directory / "best.pt",
        model,
        architecture=TINY_ARCH,
        class_names=TINY_CLASSES,
        spec=PreprocessSpec(crop_size=TINY_SIZE, resize_size=TINY_SIZE),
        training={"mode": "all", "dataset": "shapes", "epochs": 0},
        metrics={"accuracy": accuracy},
    )
    return export_checkpoint(ckpt, name=name)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A registered ResNet-18 (random weights, 4 shape classes, 64 px) in the session store."""
    return register_tiny(tmp_path_factory.mktemp("ckpt"))
