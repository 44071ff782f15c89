"""Where a serving worker's CPU goes under load: thread by thread, kernel time, page faults.

    .venv/bin/python -m bench.server_cpu                      # INT8, concurrency 32
    .venv/bin/python -m bench.server_cpu --precision fp32 --env MALLOC_MMAP_THRESHOLD_=33554432

Registers the benchmark's ResNet-50 (bench.predict: random weights, an INT8 graph) in a
temporary model store, starts `lantern serve`, warms it up, then sends `--requests`
closed-loop POST /predict at `--concurrency` (bench.loadgen) and prints, per image: the
worker's CPU by stage as the service itself counts it on /metrics (event loop, decode,
preprocess, model, and what the worker spent outside them), the CPU of the server's
event-loop thread (the process's main thread) and of each other thread, the kernel's
share of it (system CPU), the minor page faults, and the largest RSS of the server's
processes at the end. `--env NAME=VALUE` (repeatable) sets a variable
for the server only, to compare allocator settings. Sampling profilers (py-spy) count a
thread that is page-faulting as running its Python frame, so faults and system time only
show up here. This is how the page faults of ONNX Runtime without its memory arena were
found (BENCHMARKS.md "ONNX Runtime's memory arena"); not part of `make bench`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from bench.predict import (
    _process_tree,
    add_model_arguments,
    free_port,
    launch_server,
    load,
    make_jpegs,
    outside_stages,
    register_model,
)
from bench.store import use_temporary_store
from service.metrics import CPU_STAGES


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--precision", choices=("fp32", "int8"), default="int8")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
    add_model_arguments(p)
    args = p.parse_args(argv)
    extra = dict(item.split("=", 1) for item in args.env)

    tmp = use_temporary_store() / "work"
    tmp.mkdir(parents=True, exist_ok=True)
    print(f"registering a {args.arch} at {args.image_size} px in a temporary model store ...")
    tag = register_model(tmp, args.arch, args.image_size)
    env = {
        **os.environ,
        **extra,
        "LANTERN_MODEL": tag,
        "LANTERN_PRECISION": args.precision,
        "LANTERN_MAX_LATENCY_MS": "20000",
    }
    port = free_port()
    proc = launch_server(port, tmp / "serve.log", env, ready_timeout_s=180)
    url = f"http://127.0.0.1:{port}"
    images = make_jpegs(16)

    try:
        asyncio.run(load(url, images, 4, 32, args.precision))  # warm-up
        threads0, system0, faults0 = snapshot(proc.pid)
        result = asyncio.run(load(url, images, args.concurrency, args.requests, args.precision))
        threads1, system1, faults1 = snapshot(proc.pid)
        rss = max(process.memory_info().rss for process in _process_tree(proc.pid)) / 2**20
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    n = args.requests
    threads = sorted(
        (
            (seconds - threads0.get(k, (0.0, 0))[0], faults - threads0.get(k, (0.0, 0))[1], k)
            for k, (seconds, faults) in threads1.items()
        ),
        reverse=True,
    )
    total = sum(seconds for seconds, _, _ in threads)
    print(
        f"{args.precision}, concurrency {args.concurrency}, {n} requests, env {extra or '{}'}: "
        f"{result.throughput:.1f} images/s, mean model batch {result.mean_batch or 0:.1f}"
    )
    print(f"  server CPU per image        {total * 1000 / n:7.2f} ms")
    print(f"    of which system (kernel)  {(system1 - system0) * 1000 / n:7.2f} ms")
    print(f"  minor page faults per image {(faults1 - faults0) / n:7.0f}")
    print(f"  largest RSS at the end      {rss:7.0f} MiB")
    print("  the worker's CPU by stage, per image (lantern_cpu_seconds_total on /metrics):")
    stages = result.stage_cpu_ms or {}
    for name in (*CPU_STAGES, "worker"):
        print(f"    {name:<26} {stages.get(name, 0.0):7.2f} ms")
    print(f"    {'worker, outside the stages':<26} {outside_stages(stages):7.2f} ms")
    print("  threads, CPU and minor page faults per image (the event loop is the main thread):")
    for seconds, thread_faults, (pid, tid) in threads:
        if seconds * 1000 / n >= 0.1:
            name = "event loop" if pid == tid else f"thread {tid}"
            print(f"    pid {pid} {name:<14} {seconds * 1000 / n:7.2f} ms {thread_faults / n:7.0f}")
    return 0


Threads = dict[tuple[int, int], tuple[float, int]]
"""(CPU seconds, minor page faults) per (pid, thread id)."""


def snapshot(root_pid: int) -> tuple[Threads, float, int]:
    """The counters of a server's processes now: per thread, the system CPU seconds of
    all their threads, and the processes' minor page faults."""
    threads: Threads = {}
    system, faults = 0.0, 0
    for process in _process_tree(root_pid):
        for thread in process.threads():
            key = (process.pid, thread.id)
            try:
                thread_faults = _minor_faults(f"/proc/{process.pid}/task/{thread.id}/stat")
            except OSError:  # the thread ended meanwhile
                continue
            threads[key] = (thread.user_time + thread.system_time, thread_faults)
            system += thread.system_time
        faults += _minor_faults(f"/proc/{process.pid}/stat")
    return threads, system, faults


def minor_faults(root_pid: int) -> int:
    """The minor page faults of a server's processes so far."""
    return sum(_minor_faults(f"/proc/{process.pid}/stat") for process in _process_tree(root_pid))


def _minor_faults(stat_path: str) -> int:
    """Field 10 of a /proc stat file (minflt); the command name before it may hold spaces."""
    return int(Path(stat_path).read_text().rsplit(")", 1)[1].split()[7])


if __name__ == "__main__":
    sys.exit(main())
