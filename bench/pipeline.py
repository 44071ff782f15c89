"""The service's prediction pipeline without HTTP: how close to its runtime the service
could come if HTTP cost nothing.

    .venv/bin/python -m bench.pipeline --model lantern-classifier:<version> --precision int8

Builds the `Lantern` service class in this process (`Lantern.inner()`: the bundle, graph,
model streams, micro-batcher, decode threads and CPU counters that `lantern serve` builds
from the same settings) and has `--concurrency` tasks await its `predict_uploads` with one
JPEG each, `--requests` in all: every step of POST /predict after the upload is read and
before the answer is written (decode, preprocess, batching, the model, top-k), none of
the HTTP around it. Prints one JSON line: images/s, this process's CPU per image, and the
service's own count by stage (lantern_cpu_seconds_total, read as /metrics would show it).

`bench.predict_ratio` runs it every round in a fresh process, between raw ONNX Runtime and
the real server, so that the gap from the service to raw splits into what the pipeline
costs (raw to here) and what HTTP costs (here to the service). Not part of `make bench`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

PRECISIONS = ("fp32", "int8")


@dataclass
class PipelineRun:
    requests: int
    throughput: float  # images/s while every task had a request out (no drain)
    cpu_ms: float  # this process's CPU per image, every thread
    stage_cpu_ms: dict[str, float]  # lantern_cpu_seconds_total per image, and "worker"
    precisions: list[str]  # the precisions that answered, as /predict would name them


async def drive(service: Any, images: list[bytes], concurrency: int, requests: int) -> PipelineRun:
    """`requests` calls of `service.predict_uploads` (images cycled) by `concurrency` tasks,
    each awaiting its answer before it sends the next: the closed loop of bench.loadgen."""
    import prometheus_client

    from bench.predict import cpu_counters
    from service.uploads import Upload

    uploads = [Upload(name=f"{i}.jpg", data=data) for i, data in enumerate(images)]
    next_index = 0
    answered = 0
    steady: tuple[int, float] = (0, 0.0)
    precisions: set[str] = set()

    async def task() -> None:
        nonlocal next_index, answered, steady
        while next_index < requests:
            i = next_index
            next_index += 1
            if next_index == requests:  # the last one: the drain starts
                steady = (answered, time.perf_counter() - start)
            (answer,) = await service.predict_uploads([uploads[i % len(uploads)]], 5)
            precisions.add(answer["precision"])
            answered += 1

    before = cpu_counters(prometheus_client.generate_latest().decode())
    cpu0 = time.process_time()
    start = time.perf_counter()
    await asyncio.gather(*(task() for _ in range(concurrency)))
    seconds = time.perf_counter() - start
    cpu = time.process_time() - cpu0
    after = cpu_counters(prometheus_client.generate_latest().decode())
    steady_answers, steady_seconds = steady
    throughput = (
        steady_answers / steady_seconds
        if steady_answers and steady_seconds > 0
        else requests / seconds
    )
    return PipelineRun(
        requests=requests,
        throughput=throughput,
        cpu_ms=cpu * 1000 / requests,
        stage_cpu_ms={k: (after[k] - before.get(k, 0.0)) * 1000 / requests for k in after},
        precisions=sorted(precisions),
    )


def measure(images: list[bytes], concurrency: int, requests: int) -> PipelineRun:
    """Build the service from LANTERN_* settings (LANTERN_MODEL, LANTERN_PRECISION, ...),
    warm it up with one round of `concurrency` requests, then measure `requests`."""
    from service.service import Lantern

    service = Lantern.inner()  # type: ignore[attr-defined]

    async def warm_then_measure() -> PipelineRun:
        try:
            await drive(service, images, concurrency, 2 * concurrency)
            return await drive(service, images, concurrency, requests)
        finally:
            await service.batcher.aclose()

    return asyncio.run(warm_then_measure())


def run_in_subprocess(
    tag: str, precision: str, concurrency: int, requests: int, timeout_s: float = 600
) -> PipelineRun:
    """`measure` in a fresh interpreter (a process of its own, like the server's worker,
    gone before the next measurement): the server's environment, model and precision."""
    env = {
        **os.environ,
        "LANTERN_MODEL": tag,
        "LANTERN_PRECISION": precision,
        "LANTERN_MAX_LATENCY_MS": os.environ.get("LANTERN_MAX_LATENCY_MS", "20000"),
        "BENTOML_DO_NOT_TRACK": "true",
    }
    argv = [sys.executable, "-m", "bench.pipeline", "--concurrency", str(concurrency)]
    argv += ["--requests", str(requests)]
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout_s)
    if out.returncode != 0:
        raise RuntimeError(f"bench.pipeline failed ({out.returncode}): {out.stderr[-3000:]}")
    return PipelineRun(**json.loads(out.stdout.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> int:
    from bench.predict import make_jpegs

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--model", help="the model tag (default: LANTERN_MODEL)")
    p.add_argument("--precision", choices=PRECISIONS, help="default: LANTERN_PRECISION")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--requests", type=int, default=640)
    args = p.parse_args(argv)
    if args.model:
        os.environ["LANTERN_MODEL"] = args.model
    if args.precision:
        os.environ["LANTERN_PRECISION"] = args.precision
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    run = measure(make_jpegs(16), args.concurrency, args.requests)
    print(json.dumps(asdict(run)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
