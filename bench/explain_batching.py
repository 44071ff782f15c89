"""Explanation jobs grouped across requests: many one-image jobs against one big job.

    .venv/bin/python -m bench.explain_batching [--jobs 32] [--arch resnet18] [--size 224]
        [--repeats 3] [--methods gradcam,saliency,activations]

A real redis-server and a real ExplainWorker (in this process, model loaded once and
shared by every round), a registered model with random weights (nothing downloaded).
Each round, on the same worker and the same images:

    one job        one job carrying all `--jobs` images
    single jobs    `--jobs` one-image jobs, enqueued the way the service enqueues them;
                   the worker explains them in groups (LANTERN_EXPLAIN_GROUP_JOBS)
    solo jobs      with --solo only (slow): the same one-image jobs with grouping off
                   (explain_group_jobs=1), for reference: what grouping saves

Each contender is timed over the worker's own loop (dequeue, claim, execute: RQ's work()
less its start-up and shutdown) until its queue is empty (artifacts, progress and
manifests written, results recorded in Redis), round-robin in alternating order, so
load from other processes falls on all of them alike. The ratio that counts is single
jobs / one job in images per second, per round (the same round, the same machine load),
reported as median and spread.
Target: >= 0.8.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import time
from pathlib import Path
from typing import Any

from bench.store import use_temporary_store

TARGET = 0.8


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=32, help="images: one job vs this many jobs")
    p.add_argument("--arch", default="resnet18", help="architecture (random weights)")
    p.add_argument("--size", type=int, default=224, help="input size in pixels")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (after one warm-up)")
    p.add_argument("--methods", default="gradcam,saliency,activations")
    p.add_argument("--solo", action="store_true", help="also time the jobs with grouping off")
    return p


def _register_model(root: Path, arch: str, size: int) -> str:
    import torch

    from lantern.core.preprocess import PreprocessSpec
    from models.checkpoint import save_checkpoint
    from models.export import export_checkpoint
    from models.network import build_model

    torch.manual_seed(0)
    classes = ["circle", "square", "triangle", "cross"]
    model = build_model(arch, len(classes), weights="none")
    ckpt = save_checkpoint(
        root / "best.pt",
        model,
        architecture=arch,
        class_names=classes,
        spec=PreprocessSpec(crop_size=size, resize_size=size),
        training={"mode": "all", "dataset": "shapes", "epochs": 0},
        metrics={"accuracy": 0.25},
    )
    return str(export_checkpoint(ckpt).tag)


def main(args: argparse.Namespace) -> int:
    root = use_temporary_store("lantern-bench-batching-")

    import io

    import redis
    import torch

    from lantern import redis_server
    from lantern.core.jobs import JobStatus, find_or_enqueue, job_status, parse_methods
    from lantern.core.settings import Settings
    from lantern.core.store import DirectoryStore
    from models.data import draw_shape
    from models.network import resolve_device
    from workers.model_cache import ModelCache
    from workers.worker import ExplainWorker

    tag = _register_model(root, args.arch, args.size)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    server = redis_server.start_redis(port, root / "redis", persist=False)
    url = f"redis://127.0.0.1:{port}/0"
    conn = redis.Redis.from_url(url)
    methods = [m.value for m in parse_methods(args.methods)]
    images = []
    for i in range(args.jobs):
        buf = io.BytesIO()
        draw_shape(i, size=args.size).image.save(buf, format="PNG")
        images.append((f"img{i:02d}", buf.getvalue()))
    models = ModelCache(resolve_device("cpu"))
    base: dict[str, Any] = {
        "redis_url": url,
        "queue": "bench-batching",
        "device": "cpu",
        "model": tag,
        "max_images_per_job": max(64, args.jobs),
    }
    print(
        f"{args.jobs} images, {args.arch} at {args.size} px, {', '.join(methods)}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads",
        flush=True,
    )

    def run(name: str, group_jobs: int, per_job: bool, round_: int) -> float:
        conn.flushall()
        store_dir = root / f"artifacts-{name}-{round_}"
        settings = Settings(**base, artifact_dir=store_dir, explain_group_jobs=group_jobs)
        store = DirectoryStore(store_dir)
        batches = [[im] for im in images] if per_job else [images]
        ids = [find_or_enqueue(conn, store, b, tag, methods, settings=settings)[0] for b in batches]
        worker = ExplainWorker(conn, settings, store=store, models=models)
        worker.run_maintenance_tasks()  # not timed: it runs once per maintenance interval
        # The worker's own loop (RQ's work()) without its start-up and shutdown.
        start = time.perf_counter()
        while (dequeued := worker.dequeue_job_and_maintain_ttl(None)) is not None:
            worker.execute_job(*dequeued)
        took = time.perf_counter() - start
        for job_id in ids:
            status = job_status(conn, job_id, store, settings)
            assert status is not None and status["status"] == JobStatus.FINISHED, status
        return took

    contenders = {
        "one job": (args.jobs, False),
        "single jobs": (args.jobs, True),
    }
    if args.solo:
        contenders["solo jobs"] = (1, True)
    times: dict[str, list[float]] = {k: [] for k in contenders}
    try:
        for round_ in range(args.repeats + 1):  # round 0 warms up
            # The order alternates (A B, B A, ...): a machine getting busier or quieter
            # within a round then favours neither contender.
            order = list(contenders.items())
            for name, (group_jobs, per_job) in order if round_ % 2 else order[::-1]:
                took = run(name.replace(" ", "-"), group_jobs, per_job, round_)
                if round_ > 0:
                    times[name].append(took)
                    print(f"  round {round_} {name:<12} {took:6.2f} s", flush=True)
    finally:
        conn.close()
        server.terminate()
        server.wait(timeout=10)

    print("\n| contender    | images/s (best) | images/s (median) |")
    print("|--------------|----------------:|------------------:|")
    for name, ts in times.items():
        print(
            f"| {name:<12} | {args.jobs / min(ts):15.2f} | "
            f"{args.jobs / statistics.median(ts):17.2f} |"
        )
    ratios = [o / s for o, s in zip(times["one job"], times["single jobs"], strict=True)]
    met = "met" if statistics.median(ratios) >= TARGET else "NOT met"
    print(
        f"\nsingle jobs / one job = {statistics.median(ratios):.2f} median, "
        f"{min(ratios):.2f}-{max(ratios):.2f} over {len(ratios)} rounds "
        f"(target >= {TARGET}: {met})"
    )
    if args.solo:
        solo = [o / s for o, s in zip(times["one job"], times["solo jobs"], strict=True)]
        print(
            f"solo jobs / one job   = {statistics.median(solo):.2f} median, "
            f"{min(solo):.2f}-{max(solo):.2f} (grouping off, for reference)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(get_args_parser().parse_args()))
