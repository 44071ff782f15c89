"""The service against its runtime, in alternating rounds: /predict images/s at one
concurrency over the best raw ONNX Runtime images/s of the same graph, measured round by
round on the same machine.

    .venv/bin/python -m bench.predict_ratio                         # INT8, concurrency 32
    .venv/bin/python -m bench.predict_ratio --precision fp32 --rounds 7
    .venv/bin/python -m bench.predict_ratio --arch resnet18 --image-size 160   # a cheaper model

`bench.predict` measures the raw rates once and the service once, minutes apart; on a
shared 2-vCPU machine either can move by 10-15 % between runs, so one run's ratio is good
to about ±0.1 (BENCHMARKS.md, "ONNX Runtime's memory arena"). `--arch` and `--image-size`
register a cheaper model instead of the 224 px ResNet-50: on a slow CPU, a model that costs
what ResNet-50 costs on a fast one, so the work outside the model weighs as much as it
would there. Here one `lantern serve`
stays up (warmed up once) while every round measures both: raw ONNX Runtime in this
process, as `bench.predict` does it (the all-cores session and the model streams, batch 1,
8 and 32, `--seconds` each; the round's best of them is the yardstick), and
`--requests` closed-loop POST /predict at `--concurrency` (bench.loadgen), and between
them the service's pipeline without HTTP (bench.pipeline: the same service class in a
process of its own, its `predict_uploads` awaited by `--concurrency` tasks), so that the
gap to raw splits into what decoding, preprocessing and batching cost and what HTTP costs.
The order rotates from round to round, so a machine getting busier or quieter does not
favour any side. Prints each round's ratios and their medians over the rounds, with the
server's and the load generator's CPU per image (they share the machine's cores, which the
raw runs have to themselves). Not part of `make bench` (about 6 minutes for 5 rounds).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys

from bench.pipeline import PipelineRun, run_in_subprocess
from bench.predict import (
    LoadResult,
    add_model_arguments,
    bench_ort,
    bench_ort_streams,
    describe_stages,
    free_port,
    load,
    machine,
    make_jpegs,
    register_model,
    serve_log,
    start_server,
)
from bench.store import use_temporary_store
from lantern.core.cpus import usable_cpus


def raw_rates(tag: str, precision: str, seconds: float) -> dict[str, float]:
    """Images/s of the graph per way of running it: "all cores, batch b" and "N streams,
    batch b" (bench.predict's two yardsticks)."""
    rates = {
        f"all cores, batch {b}": rate for b, (rate, _) in bench_ort(tag, seconds, precision).items()
    }
    streams = usable_cpus()
    for b, rate in bench_ort_streams(tag, seconds, precision).items():
        rates[f"{streams} streams, batch {b}"] = rate
    return rates


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--precision", choices=("fp32", "int8"), default="int8")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--requests", type=int, default=320, help="service requests per round")
    p.add_argument("--seconds", type=float, default=6.0, help="per raw configuration per round")
    add_model_arguments(p)
    args = p.parse_args(argv)

    tmp = use_temporary_store() / "work"
    tmp.mkdir(parents=True, exist_ok=True)
    print(f"{machine()}; registering a {args.arch} at {args.image_size} px ...", flush=True)
    tag = register_model(tmp, args.arch, args.image_size)
    images = make_jpegs(16)
    port = free_port()
    proc = start_server(tag, port, serve_log(tmp, args.precision), args.precision)
    url = f"http://127.0.0.1:{port}"
    ratios: list[float] = []
    caps: list[float] = []  # what the cores allow the service, over raw, per round
    pipeline_ratios: list[float] = []  # the pipeline without HTTP, over raw, per round
    cores = usable_cpus()
    try:
        # Warm-up: thread pools, allocator growth, ONNX Runtime's first batched shapes.
        asyncio.run(load(url, images, args.concurrency, 2 * args.concurrency, args.precision))
        for round_ in range(args.rounds):
            service: LoadResult | None = None
            pipeline: PipelineRun | None = None
            raw: dict[str, float] = {}
            for side in rotated(SIDES, round_):
                if side == "raw":
                    raw = raw_rates(tag, args.precision, args.seconds)
                elif side == "pipeline":
                    pipeline = run_in_subprocess(
                        tag, args.precision, args.concurrency, args.requests
                    )
                else:
                    service = asyncio.run(
                        load(url, images, args.concurrency, args.requests, args.precision, proc.pid)
                    )
            assert service is not None and pipeline is not None
            if pipeline.precisions != [args.precision]:
                raise RuntimeError(f"asked for {args.precision}, the pipeline ran {pipeline}")
            best = max(raw, key=raw.__getitem__)
            ratios.append(service.throughput / raw[best])
            pipeline_ratios.append(pipeline.throughput / raw[best])
            print(
                f"round {round_ + 1}: service {service.throughput:.1f} images/s "
                f"({service.requests / service.seconds:.1f} with the drain; mean batch "
                f"{service.mean_batch or 0:.1f}, server CPU "
                f"{service.server_cpu_ms or 0:.1f} ms, load generator CPU "
                f"{service.client_cpu_ms or 0:.1f} ms per image), raw best {raw[best]:.1f} "
                f"({best}): {ratios[-1]:.2f}x",
                flush=True,
            )
            if service.server_cpu_ms:
                # What the cores allow at the CPU the server spent per image: a bound on
                # images/s that does not depend on how the ends of a round are counted.
                cap = cores * 1000 / service.server_cpu_ms
                caps.append(cap / raw[best])
                print(
                    f"  {cores} cores at {service.server_cpu_ms:.1f} ms per image allow "
                    f"{cap:.1f} images/s: {caps[-1]:.2f}x raw",
                    flush=True,
                )
            if service.stage_cpu_ms:
                print(f"  the worker per image: {describe_stages(service.stage_cpu_ms)}")
            print(
                f"  without HTTP (bench.pipeline): {pipeline.throughput:.1f} images/s, "
                f"{pipeline.cpu_ms:.1f} ms of CPU per image "
                f"({describe_stages(pipeline.stage_cpu_ms)}): {pipeline_ratios[-1]:.2f}x raw",
                flush=True,
            )
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(
        f"{args.arch} {args.image_size} px {args.precision}, concurrency {args.concurrency}, "
        f"{args.rounds} rounds: service/raw "
        f"median {statistics.median(ratios):.2f}x (rounds {min(ratios):.2f}-{max(ratios):.2f}x)"
        + (f"; the cores allow median {statistics.median(caps):.2f}x" if caps else "")
        + f"; without HTTP median {statistics.median(pipeline_ratios):.2f}x "
        f"(rounds {min(pipeline_ratios):.2f}-{max(pipeline_ratios):.2f}x)"
    )
    return 0


SIDES = ("raw", "pipeline", "service")


def rotated(sides: tuple[str, ...], round_: int) -> tuple[str, ...]:
    """The order of the measurements in round `round_`: each side first in turn."""
    shift = round_ % len(sides)
    return sides[shift:] + sides[:shift]


if __name__ == "__main__":
    sys.exit(main())
