"""The single-machine supervisor behind `lantern up` (and so `make up`).

It runs the same commands docker compose runs — `lantern models ensure`, `lantern worker`,
`lantern serve` — as child processes, plus a Redis of its own unless REDIS_URL is set.

Its Redis is private: a password generated once and kept (mode 0600) in
`<data-dir>/redis/password`, bound to 127.0.0.1, handed to the children in REDIS_URL.

It supervises: a part that exits is started again after a backoff (1 s, doubling, at most
30 s), and the restart is logged. Redis comes back on the same port, data and password, so
the jobs it had accepted survive; the API keeps answering /predict meanwhile, and workers
wait for Redis. Only Ctrl-C (SIGINT/SIGTERM), or a part that keeps crashing
(MAX_RESTARTS restarts within RESTART_WINDOW_S), stops everything, the latter with a
one-line reason and exit status 1.

Children get their own process group, so Ctrl-C reaches only the supervisor, which stops
them in order: the API first (no new jobs), then the workers (each finishes its job), Redis
last (it writes its append-only file). Torch is never imported here.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lantern.core.errors import LanternError
from lantern.redis_server import start_redis

STOP_TIMEOUT_S = 30.0
MAX_RESTARTS = 5  # within RESTART_WINDOW_S: then the part counts as crashing for good
RESTART_WINDOW_S = 60.0
FIRST_BACKOFF_S = 1.0
MAX_BACKOFF_S = 30.0
PASSWORD_FILE = "password"

# The commands each part runs; docker-compose.yml runs the same (tests/test_deploy.py checks).
MODEL_COMMAND = ("models", "ensure")
WORKER_COMMAND = ("worker",)
API_COMMAND = ("serve",)  # + --host/--port


@dataclass
class Part:
    """One supervised child: how to start it, the running process, its restart history."""

    name: str
    start: Callable[[], subprocess.Popen[bytes]]
    process: subprocess.Popen[bytes] | None = None
    restarts: deque[float] = field(default_factory=deque)
    restart_at: float | None = None  # when an exited part is due to start again

    def backoff(self) -> float:
        return min(MAX_BACKOFF_S, FIRST_BACKOFF_S * 2 ** max(0, len(self.restarts) - 1))


@dataclass
class Stack:
    host: str = "127.0.0.1"
    port: int = 3000
    redis_port: int = 6379
    workers: int = 1
    data_dir: Path = Path("var")
    max_restarts: int = MAX_RESTARTS
    restart_window_s: float = RESTART_WINDOW_S
    parts: list[Part] = field(default_factory=list)
    _stopping: bool = False

    def run(self) -> int:
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)
        try:
            env = self._environment()
            self._warn_if_exposed(env)
            self._ensure_model(env)
            for n in range(self.workers):
                self._add(f"worker-{n + 1}", self._lantern_starter([*WORKER_COMMAND], env))
            api = [*API_COMMAND, "--host", self.host, "--port", str(self.port)]
            self._add("api", self._lantern_starter(api, env))
            self._wait_until_ready()
            self._announce(env, served_demo(f"http://{_local(self.host)}:{self.port}", env))
            while True:
                self._supervise()
                time.sleep(0.5)
        except _Stop:
            return 0
        except LanternError as e:
            print(f"lantern up: {e}", file=sys.stderr, flush=True)
            return 1
        finally:
            self._stop_all()

    # --- start ------------------------------------------------------------------------
    def _environment(self) -> dict[str, str]:
        from lantern.core.settings import get_settings

        env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true", "PYTHONUNBUFFERED": "1"}
        env.setdefault("LANTERN_ARTIFACT_DIR", str((self.data_dir / "artifacts").resolve()))
        if "REDIS_URL" in env or "LANTERN_REDIS_URL" in env:
            return env  # the user's Redis, used as given
        redis_dir = self.data_dir / "redis"
        password = redis_password(redis_dir)
        fsync = get_settings().redis_appendfsync
        print(
            f"starting Redis on 127.0.0.1:{self.redis_port} (data in {redis_dir}, password in "
            f"{redis_dir / PASSWORD_FILE}, appendfsync {fsync})",
            flush=True,
        )

        def start() -> subprocess.Popen[bytes]:
            return start_redis(
                self.redis_port, redis_dir, persist=True, password=password, appendfsync=fsync
            )

        self.parts.append(Part("redis", start, start()))
        env["REDIS_URL"] = f"redis://:{password}@127.0.0.1:{self.redis_port}/0"
        return env

    def _warn_if_exposed(self, env: dict[str, str]) -> None:
        if self.host in ("127.0.0.1", "localhost", "::1"):
            return
        if not env.get("LANTERN_API_KEYS", "").strip():
            print(
                "\n"
                + "!" * 78
                + f"\nWARNING: the API listens on {self.host}, reachable from other machines, "
                "and LANTERN_API_KEYS is not set:\nanyone who can reach this port can use it. "
                "Set LANTERN_API_KEYS=<a long random key> to require a key.\n" + "!" * 78 + "\n",
                file=sys.stderr,
                flush=True,
            )

    def _ensure_model(self, env: dict[str, str]) -> None:
        result = subprocess.run(_lantern(*MODEL_COMMAND), env=env, check=False)
        if self._stopping:
            raise _Stop
        if result.returncode != 0:
            raise LanternError("could not find or make a model (see the messages above)")

    def _lantern_starter(
        self, args: list[str], env: dict[str, str]
    ) -> Callable[[], subprocess.Popen[bytes]]:
        return lambda: subprocess.Popen(_lantern(*args), env=env, start_new_session=True)

    def _add(self, name: str, start: Callable[[], subprocess.Popen[bytes]]) -> None:
        self.parts.append(Part(name, start, start()))

    def _wait_until_ready(self, timeout: float = 300.0) -> None:
        url = f"http://{_local(self.host)}:{self.port}/readyz"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._supervise()
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise LanternError(f"the API did not become ready at {url} within {timeout:.0f}s")

    def _announce(self, env: dict[str, str], demo: str | None = None) -> None:
        base = f"http://{_local(self.host)}:{self.port}"
        redis_url = env.get("REDIS_URL") or env.get("LANTERN_REDIS_URL") or ""
        demo_lines = (
            f"  model         {demo}\n"
            "                it knows nothing else; for a real one: lantern train, lantern export\n"
            if demo
            else ""
        )
        print(
            f"\nLantern is up.\n"
            f"{demo_lines}"
            f"  web page      {base}/\n"
            f"  predict       curl -F image=@cat.jpg {base}/predict\n"
            f"  explain       curl -F images=@cat.jpg -F methods=gradcam {base}/explain\n"
            f"  API docs      {base}/docs  (OpenAPI: {base}/docs.json)\n"
            f"  metrics       {base}/metrics\n"
            f"  redis         {redact(redis_url)}\n"
            f"  artifacts     {env['LANTERN_ARTIFACT_DIR']}\n"
            f"Ctrl-C stops everything.\n",
            flush=True,
        )

    # --- supervise --------------------------------------------------------------------
    def _supervise(self) -> None:
        """Restart parts that exited (after their backoff); raise if one keeps crashing."""
        if self._stopping:
            raise _Stop
        now = time.monotonic()
        for part in self.parts:
            if part.process is not None:
                code = part.process.poll()
                if code is None:
                    continue
                part.process = None
                while part.restarts and now - part.restarts[0] > self.restart_window_s:
                    part.restarts.popleft()
                if len(part.restarts) >= self.max_restarts:
                    raise LanternError(
                        f"{part.name} keeps crashing (exited with status {code} after "
                        f"{len(part.restarts)} restarts in {self.restart_window_s:.0f} s); "
                        "stopping everything"
                    )
                part.restarts.append(now)
                part.restart_at = now + part.backoff()
                print(
                    f"lantern up: {part.name} exited with status {code}; restarting it in "
                    f"{part.backoff():.0f} s (restart {len(part.restarts)} in the last "
                    f"{self.restart_window_s:.0f} s)",
                    file=sys.stderr,
                    flush=True,
                )
            if part.restart_at is not None and now >= part.restart_at:
                part.restart_at = None
                try:
                    part.process = part.start()
                except LanternError as e:  # Redis could not start (port taken, say)
                    print(f"lantern up: {part.name} did not start: {e}", file=sys.stderr)
                    part.restarts.append(time.monotonic())
                    part.restart_at = time.monotonic() + part.backoff()
                    continue
                print(f"lantern up: {part.name} restarted", file=sys.stderr, flush=True)

    def _on_signal(self, signum: int, _frame: object) -> None:
        if not self._stopping:
            print(f"\n{signal.Signals(signum).name}: stopping…", file=sys.stderr, flush=True)
        self._stopping = True

    def _stop_all(self) -> None:
        # reverse start order: API, workers, Redis
        for part in reversed(self.parts):
            proc = part.process
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                print(
                    f"{part.name} did not stop in {STOP_TIMEOUT_S:.0f}s; killing it",
                    file=sys.stderr,
                )
                proc.kill()
                proc.wait()
        self.parts.clear()


class _Stop(Exception):
    """Raised inside the supervisor loop once a stop signal has arrived."""


def redis_password(redis_dir: Path) -> str:
    """The password of `lantern up`'s Redis: generated on first use, then kept (0600)."""
    redis_dir.mkdir(parents=True, exist_ok=True)
    path = redis_dir / PASSWORD_FILE
    if path.exists():
        password = path.read_text().strip()
        if password:
            path.chmod(0o600)
            return password
    password = secrets.token_hex(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(password + "\n")
    return password


def redact(url: str) -> str:
    """A Redis URL with its password replaced by ***, for printing."""
    if "@" not in url:
        return url
    scheme, rest = url.split("://", 1) if "://" in url else ("", url)
    credentials, host = rest.rsplit("@", 1)
    user = credentials.split(":", 1)[0] if ":" in credentials else ""
    return f"{scheme}://{user}:***@{host}" if scheme else f"{user}:***@{host}"


def _lantern(*args: str) -> list[str]:
    return [sys.executable, "-m", "lantern.cli", *args]


def _local(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def served_demo(base: str, env: dict[str, str]) -> str | None:
    """GET /model's `demo` line (what a demo model knows), or None for a real model or when
    /model cannot be read: the banner then just leaves the line out."""
    import json

    keys = (env.get("LANTERN_API_KEYS") or "").split(",")
    key = next((k.strip() for k in keys if k.strip()), None)
    request = urllib.request.Request(
        f"{base}/model", headers={"Authorization": f"Bearer {key}"} if key else {}
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as r:
            demo = json.loads(r.read()).get("demo")
    except (OSError, ValueError, AttributeError):
        return None
    return str(demo) if demo else None
