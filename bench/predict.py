"""Prediction benchmark: raw ONNX Runtime (fp32 and INT8) vs torch eager vs the service.

    .venv/bin/python -m bench.predict            (what `make bench` runs)

Registers a ResNet-50 (random weights, 10 classes, 224 px) in a temporary BENTOML_HOME,
so the user's model store is never touched, with an INT8 graph quantised the way `lantern
export` does it (models.quantize; calibrated on generated pictures, and registered without
the agreement gate: random weights make agreement meaningless, and speed does not depend on
the weights' values); measures ONNX Runtime fp32 and INT8 and torch-eager throughput at
batch 1, 8 and 32; starts `lantern serve` on a free loopback port with
LANTERN_PRECISION=fp32 or int8, and measures POST /predict throughput and p50/p99 latency
at concurrency 1, 8 and 32 with closed-loop clients, one server for each run, fp32 and
INT8 taking turns in an order that alternates from one concurrency to the next; prints one
table with the INT8/fp32 ratios of the same run. Takes about 10 minutes on 2 CPU cores.
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
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import psutil

    from lantern.core.bundle import Bundle

import numpy as np

from bench.store import use_temporary_store

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
    server_cpu_ms: float | None = None  # CPU the server's processes spent per request
    client_cpu_ms: float | None = None  # CPU the load generator spent per request
    steady_throughput: float | None = None  # bench.loadgen.Run.steady_throughput
    # The worker's CPU per request by stage, as the service counts it (cpu_counters).
    stage_cpu_ms: dict[str, float] | None = None

    @property
    def throughput(self) -> float:
        """Images/s at the concurrency: while every user had a request out (the drain at
        the end left out, bench.loadgen.Run.steady_throughput) when measured so."""
        return self.steady_throughput or self.requests / self.seconds

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q))


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """`--arch` and `--image-size`: which random-weight model a benchmark registers (the
    224 px ResNet-50 by default; a cheaper one stands in for a faster CPU)."""
    from models.network import ARCHITECTURES

    parser.add_argument("--arch", choices=ARCHITECTURES, default=ARCH)
    parser.add_argument("--image-size", type=int, default=IMAGE_SIZE)


def register_model(tmp: Path, arch: str = ARCH, image_size: int = IMAGE_SIZE) -> str:
    """The benchmark's model (random weights, NUM_CLASSES classes) as a bundle with an
    INT8 graph. `arch` and `image_size` other than the defaults give a model that costs
    less per image, to see the service on a CPU as fast, relative to the model, as a
    faster machine would be (BENCHMARKS.md, "A cheaper model")."""
    import torch

    from lantern.core.preprocess import PreprocessSpec
    from models.checkpoint import save_checkpoint
    from models.export import export_checkpoint
    from models.network import build_model

    torch.manual_seed(0)
    model = build_model(arch, NUM_CLASSES, weights="none")
    ckpt = save_checkpoint(
        tmp / "bench.pt",
        model,
        architecture=arch,
        class_names=[f"class{i}" for i in range(NUM_CLASSES)],
        spec=PreprocessSpec(crop_size=image_size, resize_size=image_size),
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
    size = bundle.preprocess.crop_size
    inputs = {b: rng.standard_normal((b, 3, size, size), np.float32) for b in BATCHES}
    return {b: time_batches(lambda n: run(session, inputs[n]), b, budget_s) for b in BATCHES}


def bench_ort_streams(
    tag: str, budget_s: float, precision: str, cpu_ms: dict[int, float] | None = None
) -> dict[int, float]:
    """Images/s per batch size of the service's other way to use the cores (model
    streams, service.batcher): one single-threaded session run from one thread per usable
    CPU at once, each thread its own batches."""
    from lantern.core.bundle import load_bundle
    from service.classifier import create_session, graph_path, usable_cpus

    bundle = load_bundle(tag)
    session = create_session(graph_path(bundle, precision), provider="cpu", threads=1)
    import psutil

    rng = np.random.default_rng(0)
    size = bundle.preprocess.crop_size
    me = psutil.Process()
    rates = {}
    for b in BATCHES:
        cpu = _cpu_seconds([me])
        rates[b], images = streams_rate(
            session,
            rng.standard_normal((b, 3, size, size), np.float32),
            usable_cpus(),
            budget_s,
        )
        if cpu_ms is not None:
            # What an image costs the model itself: a single-threaded run does not spin.
            cpu_ms[b] = (_cpu_seconds([me]) - cpu) / images * 1000
    return rates


def streams_rate(
    session: object, batch: np.ndarray, streams: int, budget_s: float
) -> tuple[float, int]:
    """(images/s, images run, warm-up included) of `streams` threads running `batch`.

    The rate is the sum of each stream's own rate (its images over the time from the
    start to the end of its last batch), not all images over the time until the last
    stream is done: a stream runs whole batches, so once the budget has passed the one
    that started its last batch first sits idle while the others finish theirs. On a slow
    CPU a batch of 32 takes longer than the whole budget, and that idle tail left the
    machine 17 % idle during the raw runs (BENCHMARKS.md, "A slower AMD EPYC").
    """
    import threading

    from service.classifier import run

    run(session, batch)  # warm-up
    counts = [0] * streams
    elapsed = [0.0] * streams
    stop = time.perf_counter() + max(budget_s, 0.1)

    def stream(i: int) -> None:
        # At least one call each, so that a slow CPU still gives a figure.
        while counts[i] == 0 or time.perf_counter() < stop:
            run(session, batch)
            counts[i] += batch.shape[0]
            elapsed[i] = time.perf_counter() - start

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(streams)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rate = sum(n / s for n, s in zip(counts, elapsed, strict=True))
    return rate, sum(counts) + batch.shape[0]


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


def outside_stages(stage_cpu_ms: dict[str, float]) -> float:
    """What the worker spent outside the stages: its whole count less theirs."""
    from service.metrics import CPU_STAGES

    return stage_cpu_ms.get("worker", 0.0) - sum(stage_cpu_ms.get(n, 0.0) for n in CPU_STAGES)


def describe_stages(stage_cpu_ms: dict[str, float]) -> str:
    """ "event loop 0.9, decode 0.4, preprocess 1.1, model 21.9, outside 0.2 ms": the
    worker's CPU per image by stage, and what the worker spent outside the stages."""
    from service.metrics import CPU_STAGES

    parts = [f"{name.replace('_', ' ')} {stage_cpu_ms.get(name, 0.0):.1f}" for name in CPU_STAGES]
    return ", ".join([*parts, f"outside {outside_stages(stage_cpu_ms):.1f} ms"])


def cpu_counters(metrics: str) -> dict[str, float]:
    """The service's CPU counters: lantern_cpu_seconds_total by stage (event_loop, decode,
    preprocess, model) and lantern_worker_cpu_seconds_total as "worker"."""
    found: dict[str, float] = {}
    for line in metrics.splitlines():
        m = re.match(r'lantern_cpu_seconds_total\{stage="(\w+)"\}\s+(\S+)$', line)
        if m:
            found[m.group(1)] = found.get(m.group(1), 0.0) + float(m.group(2))
        m = re.match(r"lantern_worker_cpu_seconds_total\s+(\S+)$", line)
        if m:
            found["worker"] = found.get("worker", 0.0) + float(m.group(1))
    return found


async def load(
    url: str,
    images: list[bytes],
    concurrency: int,
    requests: int,
    precision: str = "",
    server_pid: int | None = None,
) -> LoadResult:
    """`requests` closed-loop POST /predict by `concurrency` users (bench.loadgen), with the
    model's mean batch from /metrics and, given the server's pid, the CPU time the server
    (its process tree) and this client spent per request."""
    import httpx
    import psutil

    from bench.loadgen import closed_loop

    server = _process_tree(server_pid) if server_pid else []
    client = psutil.Process()
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        metrics_before = (await http.get("/metrics")).text
        server_cpu, client_cpu = _cpu_seconds(server), _cpu_seconds([client])
        run = await closed_loop(url, images, concurrency, requests, precision)
        server_cpu, client_cpu = (
            _cpu_seconds(server) - server_cpu,
            _cpu_seconds([client]) - client_cpu,
        )
        metrics_after = (await http.get("/metrics")).text
    before, after = batch_counters(metrics_before), batch_counters(metrics_after)
    batches = after[1] - before[1]
    mean_batch = (after[0] - before[0]) / batches if batches else None
    stages_before, stages_after = cpu_counters(metrics_before), cpu_counters(metrics_after)
    stage_cpu_ms = {
        name: (seconds - stages_before.get(name, 0.0)) / requests * 1000
        for name, seconds in stages_after.items()
    }
    return LoadResult(
        concurrency,
        requests,
        run.seconds,
        run.latencies_ms,
        mean_batch,
        steady_throughput=run.steady_throughput,
        server_cpu_ms=server_cpu / requests * 1000 if server else None,
        client_cpu_ms=client_cpu / requests * 1000,
        stage_cpu_ms=stage_cpu_ms or None,  # None from a server without the counters
    )


def _process_tree(pid: int) -> list[psutil.Process]:
    import psutil

    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def _cpu_seconds(processes: list[psutil.Process]) -> float:
    """User + system CPU seconds of `processes` (threads included) so far."""
    import psutil

    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def bench_services(
    tag: str, requests: dict[int, int], tmp: Path, precisions: tuple[str, ...]
) -> dict[str, list[LoadResult]]:
    """Each precision's `lantern serve` at each concurrency, the precisions taking turns in
    an order that alternates from one concurrency to the next (a slow minute on a shared
    machine falls on all of them, not on the one whose turn it was). One server runs at a
    time, started and warmed up for its turn: two resident at once share the cores and the
    model store's metrics directory, and the idle one is not idle enough."""
    results: dict[str, list[LoadResult]] = {p: [] for p in precisions}
    for i, c in enumerate(CONCURRENCY):
        for precision in precisions if i % 2 == 0 else precisions[::-1]:
            log_path = serve_log(tmp, precision)
            results[precision].append(bench_service(tag, c, requests[c], log_path, precision))
    return results


def bench_service(
    tag: str, concurrency: int, requests: int, log_path: Path, precision: str
) -> LoadResult:
    """One closed-loop run at `concurrency` on a `lantern serve` started for it."""
    port = free_port()
    proc = start_server(tag, port, log_path, precision)
    url = f"http://127.0.0.1:{port}"
    images = make_jpegs(16)
    try:
        # Warm-up: the first requests pay for thread pools, allocator growth and
        # ONNX Runtime's first batched shapes.
        asyncio.run(load(url, images, 4, 32, precision))
        return asyncio.run(load(url, images, concurrency, requests, precision, proc.pid))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def serve_log(tmp: Path, precision: str) -> Path:
    return tmp / f"serve-{precision}.log"


# The instruction sets ONNX Runtime's and OpenVINO's CPU kernels choose between.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile")


def machine() -> str:
    """The CPU as /proc/cpuinfo names it, with its family, model and the instruction sets
    that decide the kernels: one model name ("AMD EPYC") covers hosts whose ResNet-50 INT8
    runs 5x apart (BENCHMARKS.md, "A slower AMD EPYC"), so the name alone cannot tell two
    runs' machines apart."""
    info = cpuinfo()
    cpu = info.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in info:
        flags = set(info.get("flags", "").split())
        isa = " ".join(f.upper() for f in ISA_FLAGS if f in flags) or "no AVX2"
        cpu += f"; family {info['cpu family']} model {info.get('model', '?')}; {isa}"
    from service.classifier import usable_cpus

    return f"{usable_cpus()} CPU cores ({cpu}), {platform.system()} {platform.release()}"


def cpuinfo() -> dict[str, str]:
    """The first CPU's fields in /proc/cpuinfo ("model name", "cpu family", "flags", ...);
    empty where there is none."""
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip():
                info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return info


def render(
    tag: str,
    ort_rates: dict[int, tuple[float, float]],
    torch_rates: dict[int, tuple[float, float]],
    service: list[LoadResult],
    provider: str,
    int8_rates: dict[int, tuple[float, float]],
    int8_service: list[LoadResult],
    fp32_cpu_ms: dict[int, float],
    int8_cpu_ms: dict[int, float],
    streams_rates: dict[str, dict[int, float]],
) -> str:
    import onnxruntime
    import torch

    from service.classifier import usable_cpus

    # The service's yardstick: the graph's best raw rate, either way of using the cores.
    best_ort = max(max(r for r, _ in ort_rates.values()), *streams_rates["fp32"].values())
    best_int8 = max(max(r for r, _ in int8_rates.values()), *streams_rates["int8"].values())
    n = usable_cpus()
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
        f"{f'  fp32, {n} streams x 1 thread':<34}"
        + "".join(f"{streams_rates['fp32'][b]:>11.1f}" for b in BATCHES),
        f"{f'  INT8, {n} streams x 1 thread':<34}"
        + "".join(f"{streams_rates['int8'][b]:>11.1f}" for b in BATCHES),
        f"{'  fp32 CPU ms per image, 1 thread':<34}"
        + "".join(f"{fp32_cpu_ms[b]:>11.1f}" for b in BATCHES),
        f"{'  INT8 CPU ms per image, 1 thread':<34}"
        + "".join(f"{int8_cpu_ms[b]:>11.1f}" for b in BATCHES),
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
        f"{'  service / best raw ORT INT8':<34}"
        + "".join(f"{r.throughput / best_int8:>10.2f}x" for r in int8_service),
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
    lines += [
        f"{'where the CPU goes, ms per image':<34}"
        + "".join(f"{f'conc. {c}':>11}" for c in CONCURRENCY),
        *_cpu_rows("fp32", service, fp32_cpu_ms),
        *_cpu_rows("INT8", int8_service, int8_cpu_ms),
        "",
    ]
    c32 = next(r for r in service if r.concurrency == 32)
    i32 = next(r for r in int8_service if r.concurrency == 32)
    c1 = next(r for r in service if r.concurrency == 1)
    ok_lat = c1.percentile(50) <= single_ms + 15
    for label, result, best in (("fp32", c32, best_ort), ("INT8", i32, best_int8)):
        ratio = result.throughput / best
        lines.append(
            f"target: {label} throughput at concurrency 32 >= 0.9 x raw ORT {label} at its best "
            f"({best:.1f}/s): {ratio:.2f}x {'MET' if ratio >= 0.9 else 'MISSED'}"
        )
    lines += [
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

    tmp = use_temporary_store() / "work"
    tmp.mkdir(parents=True, exist_ok=True)
    print(
        "registering a random-weight ResNet-50 (+ INT8 graph) in a temporary model store ...",
        flush=True,
    )
    tag = register_model(tmp)
    print("raw ONNX Runtime, fp32 then INT8 ...", flush=True)
    ort_rates = bench_ort(tag, budget, "fp32")
    int8_rates = bench_ort(tag, budget, "int8")
    print("raw ONNX Runtime as model streams (one single-threaded run per CPU) ...", flush=True)
    streams_cpu_ms: dict[str, dict[int, float]] = {"fp32": {}, "int8": {}}
    streams_rates = {
        p: bench_ort_streams(tag, budget, p, streams_cpu_ms[p]) for p in ("fp32", "int8")
    }
    print("torch eager ...", flush=True)
    torch_rates = bench_torch(tag, budget)
    print("service (lantern serve), fp32 and INT8, alternating ...", flush=True)
    services = bench_services(tag, requests, tmp, ("fp32", "int8"))
    service, int8_service = services["fp32"], services["int8"]
    provider = _served_provider(serve_log(tmp, "fp32"))
    print()
    print(
        render(
            tag,
            ort_rates,
            torch_rates,
            service,
            provider,
            int8_rates,
            int8_service,
            streams_cpu_ms["fp32"],
            streams_cpu_ms["int8"],
            streams_rates,
        )
    )
    return 0


def _cpu_rows(label: str, results: list[LoadResult], raw_cpu_ms: dict[int, float]) -> list[str]:
    """Server CPU per request, split into the model's share (the single-threaded session's CPU per
    image at the nearest batch size to the mean batch served) and everything else
    (HTTP, multipart, decoding, preprocessing, JSON, the batcher); the serving worker's
    own count by stage (lantern_cpu_seconds_total: its model stage leaves out the pool
    threads of the all-cores session that runs lone requests, so at concurrency 1 most of
    the model is "outside these"); and the load generator's, which runs on the same cores."""
    server, model, other, client = [], [], [], []
    for r in results:
        nearest = min(raw_cpu_ms, key=lambda b: abs(b - (r.mean_batch or 1)))
        server.append(r.server_cpu_ms)
        model.append(raw_cpu_ms[nearest])
        other.append(None if r.server_cpu_ms is None else r.server_cpu_ms - raw_cpu_ms[nearest])
        client.append(r.client_cpu_ms)

    def row(name: str, values: list[float | None]) -> str:
        return f"{name:<34}" + "".join(
            f"{v:>11.1f}" if v is not None else f"{'n/a':>11}" for v in values
        )

    def counted(*names: str) -> list[float | None]:
        """The worker's own count (lantern_cpu_seconds_total) of these stages, per image."""
        return [
            sum(r.stage_cpu_ms.get(n, 0.0) for n in names) if r.stage_cpu_ms else None
            for r in results
        ]

    outside = [outside_stages(r.stage_cpu_ms) if r.stage_cpu_ms else None for r in results]
    return [
        row(f"  {label} server, all threads", server),
        row(f"  {label}   of which the model (raw)", model),
        row(f"  {label}   of which the rest", other),
        row(f"  {label} the worker, as it counts", counted("worker")),
        row(f"  {label}   model", counted("model")),
        row(f"  {label}   event loop", counted("event_loop")),
        row(f"  {label}   decode + preprocess", counted("decode", "preprocess")),
        row(f"  {label}   outside these", outside),
        row(f"  {label} load generator", client),
    ]


def _served_provider(log_path: Path) -> str:
    m = re.search(r"runs on (\w+ExecutionProvider)", log_path.read_text(errors="replace"))
    return m.group(1) if m else "an unknown provider"


if __name__ == "__main__":
    sys.exit(main())
