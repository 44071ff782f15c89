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
from dataclasses import dataclass
from pathlib import Path

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


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A registered ResNet-18 (random weights, 4 shape classes, 64 px) in the session store."""
    import torch

    from lantern.core.preprocess import PreprocessSpec
    from models.checkpoint import save_checkpoint
    from models.export import export_checkpoint
    from models.network import build_model

    torch.manual_seed(0)
    model = build_model(TINY_ARCH, len(TINY_CLASSES), weights="none")
    spec = PreprocessSpec(crop_size=TINY_SIZE, resize_size=TINY_SIZE)
    ckpt = save_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "best.pt",
        model,
        architecture=TINY_ARCH,
        class_names=TINY_CLASSES,
        spec=spec,
        training={"mode": "all", "dataset": "shapes", "epochs": 0},
        metrics={"accuracy": 0.25},
    )
    return export_checkpoint(ckpt)
