"""/predict throughput of two checkouts of Lantern, measured in one run, in alternating rounds.

    git worktree add /tmp/before <commit>
    .venv/bin/python -m bench.predict_ab /tmp/before .      # before vs after a change
    .venv/bin/python -m bench.predict_ab /tmp/before . --precision int8 --concurrency 32 \
        --arch resnet18 --image-size 160                    # a model as cheap as on a fast CPU

Both trees are served by this venv's `lantern serve` (each from its own working directory,
so its own code), with the same registered ResNet-50 (random weights, fp32, 224 px), the
same JPEGs and closed-loop clients at concurrency 8 (`--precision int8`: the same
model's INT8 graph, quantised as bench.predict does it). Rounds alternate the order so that a
machine getting busier or quieter does not favour one side. Prints, per round and as
medians: images/s, the server's CPU per image (all its processes and threads) and its
minor page faults per image.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
from pathlib import Path

from bench.predict import (
    add_model_arguments,
    free_port,
    launch_server,
    load,
    make_jpegs,
    register_model,
)
from bench.server_cpu import minor_faults
from bench.store import use_temporary_store


def serve(tree: Path, tag: str, port: int, log: Path, precision: str) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "LANTERN_MODEL": tag,
        "LANTERN_PRECISION": precision,
        "LANTERN_MAX_LATENCY_MS": "20000",
        "BENTOML_DO_NOT_TRACK": "true",
    }
    return launch_server(port, log, env, ready_timeout_s=120, cwd=tree)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("a", type=Path, help="first checkout (e.g. before a change)")
    parser.add_argument("b", type=Path, help="second checkout (e.g. after it)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=240)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--precision", choices=("fp32", "int8"), default="fp32")
    add_model_arguments(parser)
    args = parser.parse_args(argv)
    tmp = use_temporary_store("lantern-bench-ab-")
    tag = register_model(tmp, args.arch, args.image_size)  # with the INT8 graph too
    images = make_jpegs(32)
    trees = {"a": args.a.resolve(), "b": args.b.resolve()}
    results: dict[str, list[tuple[float, float, float]]] = {"a": [], "b": []}
    for round_ in range(args.rounds):
        for side in ("a", "b") if round_ % 2 == 0 else ("b", "a"):
            port = free_port()
            proc = serve(trees[side], tag, port, tmp / f"{side}-{round_}.log", args.precision)
            try:
                url = f"http://127.0.0.1:{port}"
                asyncio.run(load(url, images, args.concurrency, 3 * args.concurrency))  # warm
                faults0 = minor_faults(proc.pid)
                result = asyncio.run(
                    load(url, images, args.concurrency, args.requests, server_pid=proc.pid)
                )
                faults1 = minor_faults(proc.pid)
            finally:
                proc.terminate()
                proc.wait(timeout=60)
            # The server's CPU per image (every thread of its processes) is steadier than
            # images/s on a shared machine: it does not count the time the server waited.
            cpu_ms = result.server_cpu_ms or 0.0
            faults = (faults1 - faults0) / args.requests
            results[side].append((result.throughput, cpu_ms, faults))
            print(
                f"round {round_ + 1} {side} ({trees[side]}): {result.throughput:.1f} images/s, "
                f"server CPU {cpu_ms:.1f} ms and {faults:.0f} page faults per image"
            )
    print(
        f"{args.arch} {args.image_size} px {args.precision}, concurrency {args.concurrency}, "
        "per round: "
        "images/s; server CPU ms per image; minor page faults per image"
    )
    for side, values in results.items():
        for column, unit in enumerate(("images/s", "CPU ms/image", "faults/image")):
            figures = ", ".join(f"{v[column]:.1f}" for v in values)
            median = statistics.median(v[column] for v in values)
            print(f"  {side} {trees[side]} {unit:>12}: {figures} (median {median:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
