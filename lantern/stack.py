"""The single-machine supervisor behind `lantern up` (and so `make up`).

It runs the same commands docker compose runs — `lantern models ensure`, `lantern worker`,
`lantern serve` — as child processes, plus a Redis of its own unless REDIS_URL is set.
Children get their own process group, so Ctrl-C reaches only the supervisor, which stops
them in order: the API first (no new jobs), then the workers (each finishes its job), Redis
last (it writes its append-only file). Torch is never imported here.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from lantern.errors import LanternError
from lantern.redis_server import start_redis

STOP_TIMEOUT_S = 30.0

# The commands each part runs; docker-compose.yml runs the same (tests/test_deploy.py checks).
MODEL_COMMAND = ("models", "ensure")
WORKER_COMMAND = ("worker",)
API_COMMAND = ("serve",)  # + --host/--port


@dataclass
class Stack:
    host: str = "127.0.0.1"
    port: int = 3000
    redis_port: int = 6379
    workers: int = 1
    data_dir: Path = Path("var")
    children: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)
    _stopping: bool = False

    def run(self) -> int:
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)
        env = self._environment()
        try:
            self._ensure_model(env)
            for n in range(self.workers):
                self._spawn(f"worker-{n + 1}", [*WORKER_COMMAND], env)
            self._spawn("api", [*API_COMMAND, "--host", self.host, "--port", str(self.port)], env)
            self._wait_until_ready()
            self._announce(env)
            return self._watch()
        except _Stop:
            return 0
        finally:
            self._stop_all()

    # --- start ------------------------------------------------------------------------
    def _environment(self) -> dict[str, str]:
        env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true", "PYTHONUNBUFFERED": "1"}
        env.setdefault("LANTERN_ARTIFACT_DIR", str((self.data_dir / "artifacts").resolve()))
        if "REDIS_URL" not in env and "LANTERN_REDIS_URL" not in env:
            print(f"starting Redis on 127.0.0.1:{self.redis_port} (data in {self.data_dir}/redis)")
            proc = start_redis(self.redis_port, self.data_dir / "redis", persist=True)
            self.children.append(("redis", proc))
            env["REDIS_URL"] = f"redis://127.0.0.1:{self.redis_port}/0"
        return env

    def _ensure_model(self, env: dict[str, str]) -> None:
        result = subprocess.run(_lantern(*MODEL_COMMAND), env=env, check=False)
        if result.returncode != 0:
            raise LanternError("could not find or make a model (see the messages above)")

    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> None:
        proc = subprocess.Popen(_lantern(*args), env=env, start_new_session=True)
        self.children.append((name, proc))

    def _wait_until_ready(self, timeout: float = 300.0) -> None:
        url = f"http://{_local(self.host)}:{self.port}/readyz"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_children()
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise LanternError(f"the API did not become ready at {url} within {timeout:.0f}s")

    def _announce(self, env: dict[str, str]) -> None:
        base = f"http://{_local(self.host)}:{self.port}"
        print(
            f"\nLantern is up.\n"
            f"  web page      {base}/\n"
            f"  predict       curl -F image=@cat.jpg {base}/predict\n"
            f"  explain       curl -F images=@cat.jpg -F methods=gradcam {base}/explain\n"
            f"  API docs      {base}/docs  (OpenAPI: {base}/docs.json)\n"
            f"  metrics       {base}/metrics\n"
            f"  redis         {env.get('REDIS_URL') or env.get('LANTERN_REDIS_URL')}\n"
            f"  artifacts     {env['LANTERN_ARTIFACT_DIR']}\n"
            f"Ctrl-C stops everything.\n",
            flush=True,
        )

    # --- run and stop -------------------------------------------------------------------
    def _watch(self) -> int:
        while True:
            self._check_children()
            time.sleep(0.5)

    def _check_children(self) -> None:
        if self._stopping:
            raise _Stop
        for name, proc in self.children:
            code = proc.poll()
            if code is not None:
                raise LanternError(f"{name} exited with status {code}; stopping everything")

    def _on_signal(self, signum: int, _frame: object) -> None:
        if not self._stopping:
            print(f"\n{signal.Signals(signum).name}: stopping…", file=sys.stderr, flush=True)
        self._stopping = True

    def _stop_all(self) -> None:
        # reverse start order: API, workers, Redis
        for name, proc in reversed(self.children):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    print(
                        f"{name} did not stop in {STOP_TIMEOUT_S:.0f}s; killing it", file=sys.stderr
                    )
                    proc.kill()
                    proc.wait()
        self.children.clear()


class _Stop(Exception):
    """Raised inside the supervisor loop once a stop signal has arrived."""


def _lantern(*args: str) -> list[str]:
    return [sys.executable, "-m", "lantern.cli", *args]


def _local(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
