"""Prediction benchmark: raw ONNX Runtime (fp32 and INT8) vs torch eager vs the service.

    .venv/bin/python -m bench.predict            (what `make bench` runs)

Registers a ResNet-50 (random weights, 10 classes, 224 px) in a temporary BENTOML_HOME,
so the user's model store is never touched, with an INT8 graph quantised the way `lantern
export` does it (models.quantize; calibrated on generated pictures, and registered without
the agreement gate: random weights make agreement meaningless, and speed does not depend on
the weights' values); measures ONNX Runtime fp32 and INT8 and torch-eager throughput at
batch 1, 8 and 32; starts `lantern serve` on a free loopback port, once with
LANTERN_PRECISION=fp32 and once with int8, and measures POST /predict throughput and
p50/p99 latency at concurrency 1, 8 and 32 with closed-loop clients; prints one table with
the INT8/fp32 ratios of the same run. Takes about 5 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lantern.core.bundle import Bundle

# Before anything imports bentoml: a throw-away model store for this run.
_HOME = Path(tempfile.mkdtemp(prefix="lantern-bench-"))
os.environ["BENTOML_HOME"] = str(_HOME / "bentoml")
os.environ["BENTOML_DO_NOT_TRACK"] = "true"

import numpy as np  # noqa: E402

ARCH = "resnet50"
NUM_CLASSES = 10
IMAGE_SIZE = 224
BATCHES = (1, 8, 32)
CONCURRENCY = (1, 8, 32)
UPLOAD_SIZE = (320, 240)  # a small camera-like JPEG, decoded and resized by the service


@dataclass
class LoadResult:
    concurrency: int
    requests: int
    seconds: float
    latencies_ms: list[float]
    mean_batch: float | None

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q))


def register_model(tmp: Path) -> str:
    import torch

    from lantern.core.preprocess import PreprocessSpec
    from models.checkpoint import save_checkpoint
    from models.export import export_checkpoint
    from models.network import build_model

    torch.manual_seed(0)
    model = build_model(ARCH, NUM_CLASSES, weights="none")
    ckpt = save_checkpoint(
        tmp / "bench.pt",
        model,
        architecture=ARCH,
        class_names=[f"class{i}" for i in range(NUM_CLASSES)],
        spec=PreprocessSpec(crop_size=IMAGE_SIZE, resize_size=IMAGE_SIZE),
        training={"mode": "none", "dataset": "random weights (benchmark)"},
        # Not evaluated: chance level for 10 classes. (save_bundle cannot store None yet.)
        metrics={"accuracy": 1 / NUM_CLASSES},
    )
    fp32 = export_checkpoint(ckpt)
    return register_int8(fp32, tmp)


def register_int8(fp32: Bundle, tmp: Path) -> str:
    """A second version of the same model with an INT8 graph, built as `lantern export`
    builds it but calibrated on generated pictures and registered without the gate."""
    from PIL import Image

    from lantern.core.bundle import save_bundle
    from models import quantize

    rng = np.random.default_rng(2)
    pictures = [
        Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(
            UPLOAD_SIZE, Image.Resampling.BICUBIC
        )
        for _ in range(64)
    ]
    calibration = fp32.preprocess.apply_batch(pictures)
    int8_path = quantize.quantize(fp32.onnx_path, calibration, tmp / "model.int8.onnx")
    meta = {
        **fp32.meta,
        "created_at": None,
        "int8": {
            "status": "passed",
            "agreement": 0.0,
            "reason": "benchmark: random weights, registered without the gate (speed only)",
        },
    }
    return save_bundle(fp32.onnx_path, fp32.weights_path, meta, onnx_int8_path=int8_path).tag


def time_batches(
    run: Callable[[int], object], batch: int, budget_s: float, min_iters: int = 3
) -> tuple[float, float]:
    """(images/s, median seconds per call) of `run(batch)`, after one warm-up call."""
    run(batch)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_iters or time.perf_counter() - start < budget_s:
        t0 = time.perf_counter()
        run(batch)
        times.append(time.perf_counter() - t0)
    return batch * len(times) / sum(times), statistics.median(times)


def bench_ort(tag: str, budget_s: float, precision: str) -> dict[int, tuple[float, float]]:
    from lantern.core.bundle import load_bundle
    from service.classifier import create_session, graph_path, run

    bundle = load_bundle(tag)
    session = create_session(graph_path(bundle, precision), provider="auto")
    rng = np.random.default_rng(0)
    inputs = {b: rng.standard_normal((b, 3, IMAGE_SIZE, IMAGE_SIZE), np.float32) for b in BATCHES}
    return {b: time_batches(lambda n: run(session, inputs[n]), b, budget_s) for b in BATCHES}


def bench_torch(tag: str, budget_s: float) -> dict[int, tuple[float, float]]:
    import torch

    from lantern.core.bundle import load_bundle
    from models.network import build_model

    bundle = load_bundle(tag)
    model = build_model(ARCH, NUM_CLASSES, weights="none", train_mode="all")
    model.load_state_dict(torch.load(bundle.weights_path, map_location="cpu", weights_only=True))
    model.eval()
    inputs = {b: torch.randn(b, 3, IMAGE_SIZE, IMAGE_SIZE) for b in BATCHES}

    def run(n: int) -> None:
        with torch.inference_mode():
            model(inputs[n])

    return {b: time_batches(run, b, budget_s) for b in BATCHES}


def make_jpegs(count: int) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(1)
    out = []
    for _ in range(count):
        # smooth random colour fields compress like photos, unlike white noise
        small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize(UPLOAD_SIZE, Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(tag: str, port: int, log_path: Path, precision: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "LANTERN_MODEL": tag, "LANTERN_PRECISION": precision}
    # A batch of 32 ResNet-50 images takes seconds on a small CPU, and a request may wait
    # for the batch ahead of it to finish before its own starts.
    env.setdefault("LANTERN_MAX_LATENCY_MS", "20000")
    return launch_server(port, log_path, env, ready_timeout_s=120)


def launch_server(
    port: int,
    log_path: Path,
    env: dict[str, str],
    ready_timeout_s: float,
    cwd: Path | None = None,
) -> subprocess.Popen[bytes]:
    """`lantern serve` on `port` with `env`, returned once /readyz answers 200. `cwd`: the
    checkout whose code it serves (its working directory comes first on sys.path)."""
    import httpx

    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lantern.cli", "serve", "--port", str(port)],
            cwd=cwd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + ready_timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"lantern serve exited; see {log_path}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise RuntimeError(f"lantern serve did not become ready; see {log_path}")


def batch_counters(metrics: str) -> tuple[float, float]:
    """(sum, count) of the service's lantern_batch_size histogram (images per model call)."""
    total = count = 0.0
    for line in metrics.splitlines():
        m = re.match(r"lantern_batch_size(_sum|_count)(?:\{.*\})?\s+(\S+)$", line)
        if m and m.group(1) == "_sum":
            total += float(m.group(2))
        elif m and m.group(1) == "_count":
            count += float(m.group(2))
    return total, count


async def load(
    url: str, images: list[bytes], concurrency: int, requests: int, precision: str = ""
) -> LoadResult:
    import httpx

    latencies: list[float] = []
    next_index = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        before = batch_counters((await client.get("/metrics")).text)

        async def user() -> None:
            nonlocal next_index
            while next_index < requests:
                i = next_index
                next_index += 1
                files = {"image": (f"{i}.jpg", images[i % len(images)], "image/jpeg")}
                t0 = time.perf_counter()
                response = await client.post("/predict", files=files)
                latencies.append((time.perf_counter() - t0) * 1000)
                if response.status_code != 200:
                    raise RuntimeError(f"/predict answered {response.status_code}: {response.text}")
                if precision and response.json()["precision"] != precision:
                    raise RuntimeError(f"asked for {precision}, served {response.json()}")

        start = time.perf_counter()
        await asyncio.gather(*(user() for _ in range(concurrency)))
        seconds = time.perf_counter() - start
        after = batch_counters((await client.get("/metrics")).text)
    batches = after[1] - before[1]
    mean_batch = (after[0] - before[0]) / batches if batches else None
    return LoadResult(concurrency, requests, seconds, latencies, mean_batch)


def bench_service(
    tag: str, requests: dict[int, int], log_path: Path, precision: str
) -> list[LoadResult]:
    port = free_port()
    proc = start_server(tag, port, log_path, precision)
    url = f"http://127.0.0.1:{port}"
    images = make_jpegs(16)
    try:
        # Warm-up: the first requests pay for thread pools, allocator growth and
        # ONNX Runtime's first batched shapes.
        asyncio.run(load(url, images, 4, 32, precision))
        return [asyncio.run(load(url, images, c, requests[c], precision)) for c in CONCURRENCY]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from service.classifier import usable_cpus

    return f"{usable_cpus()} CPU cores ({cpu}), {platform.system()} {platform.release()}"


def render(
    tag: str,
    ort_rates: dict[int, tuple[float, float]],
    torch_rates: dict[int, tuple[float, float]],
    service: list[LoadResult],
    provider: str,
    int8_rates: dict[int, tuple[float, float]],
    int8_service: list[LoadResult],
) -> str:
    import onnxruntime
    import torch

    best_batch = max(ort_rates, key=lambda b: ort_rates[b][0])
    best_ort = ort_rates[best_batch][0]
    single_ms = ort_rates[1][1] * 1000
    lines = [
        f"Lantern prediction benchmark: {ARCH}, {IMAGE_SIZE} px, {NUM_CLASSES} classes "
        f"(random weights), model {tag}",
        f"machine: {machine()}; onnxruntime {onnxruntime.__version__} on {provider}; "
        f"torch {torch.__version__} (threads {torch.get_num_threads()})",
        "",
        f"{'raw inference, images/s':<34}" + "".join(f"{f'batch {b}':>11}" for b in BATCHES),
        f"{'  ONNX Runtime':<34}" + "".join(f"{ort_rates[b][0]:>11.1f}" for b in BATCHES),
        f"{'  torch eager':<34}" + "".join(f"{torch_rates[b][0]:>11.1f}" for b in BATCHES),
        f"{'  ORT / torch':<34}"
        + "".join(f"{ort_rates[b][0] / torch_rates[b][0]:>10.2f}x" for b in BATCHES),
        f"{'  ONNX Runtime ms per call (p50)':<34}"
        + "".join(f"{ort_rates[b][1] * 1000:>11.1f}" for b in BATCHES),
        f"{'  ONNX Runtime INT8':<34}" + "".join(f"{int8_rates[b][0]:>11.1f}" for b in BATCHES),
        f"{'  INT8 ms per call (p50)':<34}"
        + "".join(f"{int8_rates[b][1] * 1000:>11.1f}" for b in BATCHES),
        f"{'  INT8 / fp32':<34}"
        + "".join(f"{int8_rates[b][0] / ort_rates[b][0]:>10.2f}x" for b in BATCHES),
        "",
        f"{'service POST /predict':<34}"
        + "".join(f"{f'conc. {r.concurrency}':>11}" for r in service),
        f"{'  requests':<34}" + "".join(f"{r.requests:>11d}" for r in service),
        f"{'  throughput, images/s':<34}" + "".join(f"{r.throughput:>11.1f}" for r in service),
        f"{'  latency p50, ms':<34}" + "".join(f"{r.percentile(50):>11.1f}" for r in service),
        f"{'  latency p99, ms':<34}" + "".join(f"{r.percentile(99):>11.1f}" for r in service),
        f"{'  mean model batch size':<34}"
        + "".join(f"{r.mean_batch:>11.1f}" if r.mean_batch else f"{'n/a':>11}" for r in service),
        f"{'  service / best raw ORT':<34}"
        + "".join(f"{r.throughput / best_ort:>10.2f}x" for r in service),
        "",
        f"{'service POST /predict, INT8':<34}"
        + "".join(f"{f'conc. {r.concurrency}':>11}" for r in int8_service),
        f"{'  throughput, images/s':<34}" + "".join(f"{r.throughput:>11.1f}" for r in int8_service),
        f"{'  latency p50, ms':<34}" + "".join(f"{r.percentile(50):>11.1f}" for r in int8_service),
        f"{'  latency p99, ms':<34}" + "".join(f"{r.percentile(99):>11.1f}" for r in int8_service),
        f"{'  mean model batch size':<34}"
        + "".join(
            f"{r.mean_batch:>11.1f}" if r.mean_batch else f"{'n/a':>11}" for r in int8_service
        ),
        f"{'  INT8 / fp32 service throughput':<34}"
        + "".join(
            f"{a.throughput / b.throughput:>10.2f}x"
            for a, b in zip(int8_service, service, strict=True)
        ),
        f"{'  INT8 / fp32 service p50 latency':<34}"
        + "".join(
            f"{a.percentile(50) / b.percentile(50):>10.2f}x"
            for a, b in zip(int8_service, service, strict=True)
        ),
        "",
    ]
    c32 = next(r for r in service if r.concurrency == 32)
    c1 = next(r for r in service if r.concurrency == 1)
    ok_tp = c32.throughput >= 0.85 * best_ort
    ok_lat = c1.percentile(50) <= single_ms + 15
    lines += [
        f"target: throughput at concurrency 32 >= 0.85 x raw ORT at its best batch "
        f"(batch {best_batch}, {best_ort:.1f}/s): {c32.throughput / best_ort:.2f}x "
        f"{'MET' if ok_tp else 'MISSED'}",
        f"target: p50 at concurrency 1 <= raw single-image ORT latency + 15 ms "
        f"({single_ms:.1f} + 15 ms): {c1.percentile(50):.1f} ms {'MET' if ok_lat else 'MISSED'}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--seconds", type=float, default=12, help="time budget per raw batch size")
    p.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    args = p.parse_args(argv)
    requests = {1: 12, 8: 48, 32: 96} if args.quick else {1: 60, 8: 160, 32: 320}
    budget = 3.0 if args.quick else args.seconds

    tmp = _HOME / "work"
    tmp.mkdir(parents=True, exist_ok=True)
    print(
        "registering a random-weight ResNet-50 (+ INT8 graph) in a temporary model store ...",
        flush=True,
    )
    tag = register_model(tmp)
    print("raw ONNX Runtime, fp32 then INT8 ...", flush=True)
    ort_rates = bench_ort(tag, budget, "fp32")
    int8_rates = bench_ort(tag, budget, "int8")
    print("torch eager ...", flush=True)
    torch_rates = bench_torch(tag, budget)
    print("service (lantern serve), fp32 ...", flush=True)
    service = bench_service(tag, requests, tmp / "serve.log", "fp32")
    provider = _served_provider(tmp / "serve.log")
    print("service (lantern serve), INT8 ...", flush=True)
    int8_service = bench_service(tag, requests, tmp / "serve-int8.log", "int8")
    print()
    print(render(tag, ort_rates, torch_rates, service, provider, int8_rates, int8_service))
    return 0


def _served_provider(log_path: Path) -> str:
    m = re.search(r"runs on (\w+ExecutionProvider)", log_path.read_text(errors="replace"))
    return m.group(1) if m else "an unknown provider"


if __name__ == "__main__":
    sys.exit(main())
