"""TorchServe side by side: its eager ResNet-50 against Lantern's fp32 and INT8 service.

    .venv/bin/python -m bench.torchserve [--quick] [--workers 1] [--batch-size 8]

Needs TorchServe in the environment (`.venv/bin/pip install -c constraints.txt torchserve
torch-model-archiver`) and Java 17 (`java -version`). Registers the prediction benchmark's
model (bench.predict.register_model: ResNet-50, torchvision's resnet50(weights=None,
num_classes=10) after torch.manual_seed(0), 224 px, with its INT8 graph) in a temporary
BENTOML_HOME; packs the same weights (the bundle's weights.pt) with torchvision's ResNet-50
class (bench/torchserve_model.py) and TorchServe's image classifier handler with Lantern's
preprocessing (bench/torchserve_handler.py) into a model archive; starts TorchServe on
loopback with its own batching (batch_size, max_batch_delay) and workers sized for the
cores, checks that it answers the same top-1 class as Lantern's fp32 graph for the
benchmark's JPEGs; then POSTs the same 320x240 JPEGs at concurrency 1, 8 and 32 to
`lantern serve` (LANTERN_PRECISION=fp32 and int8: bench.predict.bench_services) and to
TorchServe, with the same closed-loop clients, and prints throughput, p50/p99 and the
ratios Lantern / TorchServe of this one run. TorchServe's model store, config, logs and pid
file live in a temporary directory; it is stopped with `torchserve --stop` at the end and
any process of it still alive then is reported and killed.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

# bench.predict's registration, service run and load loop are the ones used here.
from bench import predict
from bench.store import use_temporary_store

HERE = Path(__file__).resolve().parent
MODEL_NAME = "resnet50"
INSTALL = ".venv/bin/pip install -c constraints.txt torchserve torch-model-archiver"
FULL_REQUESTS = {1: 60, 8: 160, 32: 320}  # what bench.predict sends
QUICK_REQUESTS = {1: 12, 8: 48, 32: 96}


class TorchServeMissing(RuntimeError):
    """TorchServe (or Java) is not installed here: the message says what to run."""


def tool(name: str) -> Path:
    path = Path(sys.executable).with_name(name)
    if not path.exists():
        raise TorchServeMissing(f"{name} is not installed in this environment; run: {INSTALL}")
    return path


def java_version() -> str:
    try:
        out = subprocess.run(["java", "-version"], capture_output=True, text=True, timeout=30)
    except OSError:
        raise TorchServeMissing(
            "TorchServe needs Java 17 and `java` is not on PATH; on Debian: "
            "apt-get install -y --no-install-recommends openjdk-17-jre-headless"
        ) from None
    return (out.stderr or out.stdout).splitlines()[0].strip()


def make_archive(weights: Path, store: Path, settings: dict[str, Any]) -> None:
    """The model archive (an unzipped directory in `store`) with TorchServe's batching and
    worker settings in its model-config.yaml."""
    work = store.parent / "archive"
    work.mkdir()
    (work / "index_to_name.json").write_text(
        json.dumps({str(i): f"class{i}" for i in range(predict.NUM_CLASSES)})
    )
    config = work / "model-config.yaml"
    config.write_text(
        "\n".join(
            [
                f"minWorkers: {settings['workers']}",
                f"maxWorkers: {settings['workers']}",
                f"batchSize: {settings['batch_size']}",
                f"maxBatchDelay: {settings['max_batch_delay_ms']}",
                "responseTimeout: 300",
                "handler:",
                f"  threads: {settings['threads']}",
                "",
            ]
        )
    )
    subprocess.run(
        [
            str(tool("torch-model-archiver")),
            "--model-name",
            MODEL_NAME,
            "--version",
            "1.0",
            "--model-file",
            str(HERE / "torchserve_model.py"),
            "--serialized-file",
            str(weights),
            "--handler",
            str(HERE / "torchserve_handler.py"),
            "--extra-files",
            str(work / "index_to_name.json"),
            "--config-file",
            str(config),
            "--archive-format",
            "no-archive",
            "--export-path",
            str(store),
        ],
        check=True,
    )


class TorchServe:
    """One TorchServe on loopback, everything it writes under `home`."""

    def __init__(self, home: Path, settings: dict[str, Any]):
        self.home = home
        self.settings = settings
        self.store = home / "model-store"
        self.inference_port = predict.free_port()
        self.management_port = predict.free_port()
        self.metrics_port = predict.free_port()
        self.log = home / "torchserve.out"
        # The launcher keeps its pid file in tempfile.gettempdir() and writes logs and
        # config snapshots under its working directory: all of it stays in `home`.
        self.env = {
            **os.environ,
            "TMPDIR": str(home),
            "TEMP": str(home),
            "LOG_LOCATION": str(home / "logs"),
            "METRICS_LOCATION": str(home / "logs"),
        }
        self.java_pid: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.inference_port}"

    def config(self) -> Path:
        path = self.home / "config.properties"
        path.write_text(
            "\n".join(
                [
                    f"inference_address=http://127.0.0.1:{self.inference_port}",
                    f"management_address=http://127.0.0.1:{self.management_port}",
                    f"metrics_address=http://127.0.0.1:{self.metrics_port}",
                    f"model_store={self.store}",
                    f"load_models={MODEL_NAME}",
                    f"default_workers_per_model={self.settings['workers']}",
                    "disable_token_authorization=true",
                    "enable_metrics_api=false",
                    "disable_system_metrics=true",
                    "install_py_dep_per_model=false",
                    "job_queue_size=1000",
                    "",
                ]
            )
        )
        return path

    def start(self, ready_timeout_s: float = 300) -> None:
        import httpx

        self.store.mkdir(parents=True)
        make_archive(self.settings["weights"], self.store, self.settings)
        with self.log.open("wb") as log:
            subprocess.run(
                [
                    str(tool("torchserve")),
                    "--start",
                    "--ts-config",
                    str(self.config()),
                    "--model-store",
                    str(self.store),
                    "--no-config-snapshots",
                    "--disable-token-auth",
                ],
                cwd=self.home,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                check=True,
            )
        pid_file = self.home / ".model_server.pid"
        if pid_file.exists():
            self.java_pid = int(pid_file.read_text().split()[0])
        status = f"http://127.0.0.1:{self.management_port}/models/{MODEL_NAME}"
        deadline = time.monotonic() + ready_timeout_s
        while time.monotonic() < deadline:
            if self.java_pid is None or not _alive(self.java_pid):
                raise RuntimeError(f"TorchServe exited; see {self.log} and {self.home}/logs")
            try:
                answer = httpx.get(status, timeout=5)
                workers = answer.json()[0]["workers"] if answer.status_code == 200 else []
                if len(workers) >= self.settings["workers"] and all(
                    w["status"] == "READY" for w in workers
                ):
                    return
            except (httpx.HTTPError, ValueError, KeyError, IndexError):
                pass
            time.sleep(1)
        raise RuntimeError(f"TorchServe's workers did not become ready; see {self.home}/logs")

    def stop(self) -> list[str]:
        """`torchserve --stop`, then wait for the JVM and its Python workers to exit;
        returns what had to be killed (nothing, when it stopped cleanly)."""
        import psutil

        if self.java_pid is None or not _alive(self.java_pid):
            return []
        java = psutil.Process(self.java_pid)
        family = [java, *java.children(recursive=True)]
        subprocess.run(
            [str(tool("torchserve")), "--stop"],
            cwd=self.home,
            env=self.env,
            capture_output=True,
            check=False,
        )
        _, alive = psutil.wait_procs(family, timeout=60)
        killed = []
        for process in alive:
            try:
                killed.append(f"{process.pid} {' '.join(process.cmdline()[:3])}")
                process.kill()
            except psutil.NoSuchProcess:
                pass
        return killed


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def load_torchserve(url: str, images: list[bytes], concurrency: int, requests: int) -> Any:
    """bench.predict's closed-loop clients (bench.loadgen) against TorchServe's route."""
    from bench.loadgen import closed_loop

    run = await closed_loop(url, images, concurrency, requests, path=f"/predictions/{MODEL_NAME}")
    return predict.LoadResult(
        concurrency,
        requests,
        run.seconds,
        run.latencies_ms,
        None,
        steady_throughput=run.steady_throughput,
    )


def bench_torchserve(server: TorchServe, requests: dict[int, int]) -> list[Any]:
    images = predict.make_jpegs(16)
    asyncio.run(load_torchserve(server.url, images, 4, 32))  # warm-up, as for Lantern
    return [
        asyncio.run(load_torchserve(server.url, images, c, requests[c]))
        for c in predict.CONCURRENCY
    ]


def check_same_answers(tag: str, server: TorchServe) -> str:
    """TorchServe's top-1 class and probability for each benchmark JPEG against what
    Lantern's fp32 graph gives for it (the same preprocessing, the same weights)."""
    import httpx
    from PIL import Image

    from lantern.core.bundle import load_bundle
    from service.classifier import create_session, run, softmax

    bundle = load_bundle(tag)
    session = create_session(bundle.onnx_path, provider="cpu")
    worst = 0.0
    images = predict.make_jpegs(16)
    for i, jpeg in enumerate(images):
        x = bundle.preprocess.apply(Image.open(io.BytesIO(jpeg)).convert("RGB"))[None]
        probabilities = softmax(run(session, x))[0]
        answer = httpx.post(
            f"{server.url}/predictions/{MODEL_NAME}",
            files={"image": (f"{i}.jpg", jpeg, "image/jpeg")},
            timeout=120,
        )
        answer.raise_for_status()
        scores: dict[str, float] = answer.json()
        label = max(scores, key=lambda k: scores[k])
        expected = int(np.argmax(probabilities))
        if label != f"class{expected}":
            raise RuntimeError(
                f"TorchServe answers {label} for image {i}, Lantern's fp32 graph class{expected}"
            )
        worst = max(worst, abs(scores[label] - float(probabilities[expected])))
    return f"{len(images)} of {len(images)} top-1 equal, max |Δprobability| {worst:.1e}"


def row(label: str, values: list[str]) -> str:
    return f"{label:<36}" + "".join(f"{v:>11}" for v in values)


def render(
    header: list[str],
    torchserve: list[Any],
    fp32: list[Any],
    int8: list[Any],
) -> str:
    lines = [*header, ""]
    for title, results in (
        ("TorchServe, torch eager fp32", torchserve),
        ("Lantern, ONNX Runtime fp32", fp32),
        ("Lantern, ONNX Runtime INT8", int8),
    ):
        lines += [
            row(title, [f"conc. {r.concurrency}" for r in results]),
            row("  throughput, images/s", [f"{r.throughput:.1f}" for r in results]),
            row("  latency p50, ms", [f"{r.percentile(50):.1f}" for r in results]),
            row("  latency p99, ms", [f"{r.percentile(99):.1f}" for r in results]),
            "",
        ]
    lines.append(row("Lantern / TorchServe", [f"conc. {r.concurrency}" for r in torchserve]))
    for name, results in (("fp32", fp32), ("INT8", int8)):
        pairs = list(zip(results, torchserve, strict=True))
        lines += [
            row(f"  {name} throughput", [f"{a.throughput / b.throughput:.2f}x" for a, b in pairs]),
            row(
                f"  {name} p50 latency",
                [f"{a.percentile(50) / b.percentile(50):.2f}x" for a, b in pairs],
            ),
            row(
                f"  {name} p99 latency",
                [f"{a.percentile(99) / b.percentile(99):.2f}x" for a, b in pairs],
            ),
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    p.add_argument("--workers", type=int, default=1, help="TorchServe workers")
    p.add_argument(
        "--threads", type=int, default=0, help="torch threads per worker (0: cores / workers)"
    )
    p.add_argument("--batch-size", type=int, default=8, help="TorchServe batchSize")
    p.add_argument("--max-batch-delay-ms", type=int, default=20, help="TorchServe maxBatchDelay")
    p.add_argument("--skip-lantern", action="store_true", help="TorchServe alone (for tuning)")
    args = p.parse_args(argv)
    requests = QUICK_REQUESTS if args.quick else FULL_REQUESTS
    load_1min = os.getloadavg()[0]

    from service.classifier import usable_cpus

    try:
        versions = (
            f"torchserve {_version('torchserve')}, "
            f"torch-model-archiver {_version('torch-model-archiver')}"
        )
        tool("torchserve")
        tool("torch-model-archiver")
        java = java_version()
    except TorchServeMissing as e:
        print(e, file=sys.stderr)
        return 1

    import onnxruntime
    import torch

    threads = args.threads or max(1, usable_cpus() // args.workers)
    home = Path(tempfile.mkdtemp(prefix="lantern-torchserve-"))
    store = use_temporary_store()
    work = store / "work"
    work.mkdir(parents=True, exist_ok=True)
    killed: list[str] = []
    finished = False
    try:
        print("registering the benchmark's ResNet-50 (+ INT8 graph) ...", flush=True)
        tag = predict.register_model(work)
        from lantern.core.bundle import load_bundle

        settings = {
            "workers": args.workers,
            "threads": threads,
            "batch_size": args.batch_size,
            "max_batch_delay_ms": args.max_batch_delay_ms,
            "weights": load_bundle(tag).weights_path,
        }
        fp32: list[Any] = []
        int8: list[Any] = []
        if not args.skip_lantern:
            print("Lantern (lantern serve), fp32 and INT8, alternating ...", flush=True)
            lantern = predict.bench_services(tag, requests, work, ("fp32", "int8"))
            fp32, int8 = lantern["fp32"], lantern["int8"]
        print("TorchServe ...", flush=True)
        server = TorchServe(home, settings)
        try:
            server.start()
            agreement = check_same_answers(tag, server)
            print(f"  same answers as Lantern fp32: {agreement}", flush=True)
            torchserve = bench_torchserve(server, requests)
        finally:
            killed = server.stop()
        finished = True
    finally:
        shutil.rmtree(store, ignore_errors=True)
        if finished:
            shutil.rmtree(home, ignore_errors=True)
        else:  # its logs say why TorchServe failed
            print(f"TorchServe's config and logs are kept in {home}", file=sys.stderr)

    header = [
        "TorchServe side by side: ResNet-50, 224 px, 10 classes, the same random weights "
        f"(torch.manual_seed(0)), model {tag}",
        f"machine: {predict.machine()}; load average (1 min) at start {load_1min:.2f}",
        f"{versions}, {java}; torch {torch.__version__} eager, {args.workers} worker(s) x "
        f"{threads} thread(s), batchSize {args.batch_size}, maxBatchDelay "
        f"{args.max_batch_delay_ms} ms; Lantern: onnxruntime {onnxruntime.__version__}",
        f"answers: {agreement}",
        "TorchServe stopped with `torchserve --stop`: "
        + ("cleanly" if not killed else f"had to kill {killed}"),
    ]
    print()
    if args.skip_lantern:
        print("\n".join(header))
        for r in torchserve:
            print(
                row(f"  conc. {r.concurrency}", [f"{r.throughput:.1f}/s"])
                + f"  p50 {r.percentile(50):.0f} ms  p99 {r.percentile(99):.0f} ms"
            )
    else:
        print(render(header, torchserve, fp32, int8))
    return 0


def _version(package: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        raise TorchServeMissing(f"{package} is not installed; run: {INSTALL}") from None


if __name__ == "__main__":
    sys.exit(main())
