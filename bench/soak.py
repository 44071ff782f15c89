"""Memory soak: does the serving process's RSS stay flat over thousands of /predict calls?

    .venv/bin/python -m bench.soak                       (what `make soak` runs)
    .venv/bin/python -m bench.soak --arch resnet18 --image-size 64    (a quicker model)

Registers a model with random weights (ResNet-50 at 224 px by default) in a temporary
BENTOML_HOME (or serves `--model TAG` from the current one), starts a real `lantern serve`
on a free loopback port, and sends `--requests` POST /predict calls (10,000) from
`--concurrency` closed-loop clients (32), each on a kept-alive connection of its own
(`soak` says why not httpx's pool) and each call carrying one of a set of generated
JPEGs of varied sizes (64x48 up to 1920x1080, photo-like). The RSS of
every process of the server (the `bentoml serve` arbiter and the worker that runs the
model, found as psutil children of the server) is sampled when the server is ready and
after 20 %, 60 % and 100 % of the requests (2k / 6k / 10k of 10,000); the table shows each
and the growth from the 20 % sample to the end, which must stay under 5 %.

`--probe` also runs a small sitecustomize in every server process (nothing in the service
changes) that reports the Python heap (tracemalloc) and glibc's malloc statistics
(mallinfo2: bytes the allocator holds, in use, free but kept) next to RSS, to tell Python
objects from native allocations. It slows the server down; figures from such a run are
for diagnosis, not for throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench.predict import add_model_arguments, free_port, launch_server
from bench.store import use_temporary_store

# Upload sizes, cycled: thumbnails to full-HD camera frames, landscape and portrait.
SIZES = (
    (64, 48),
    (160, 120),
    (320, 240),
    (240, 320),
    (500, 375),
    (640, 480),
    (800, 600),
    (600, 800),
    (1024, 768),
    (1280, 720),
    (1280, 960),
    (1920, 1080),
)
MIB = 1024 * 1024
TARGET_GROWTH = 0.05


def make_jpegs(count: int = 48, seed: int = 3) -> list[bytes]:
    """`count` photo-like JPEGs of varied sizes and qualities (smooth random colour fields)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        size = SIZES[i % len(SIZES)]
        small = rng.integers(0, 256, (int(rng.integers(3, 9)), int(rng.integers(3, 9)), 3))
        image = Image.fromarray(small.astype(np.uint8)).resize(size, Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=int(rng.integers(75, 96)))
        out.append(buf.getvalue())
    return out


# --- the server's processes ------------------------------------------------------------


def server_processes(pid: int) -> dict[int, str]:
    """{pid: role} of the server started as `pid` and all its descendants."""
    import psutil

    root = psutil.Process(pid)
    roles = {}
    for p in [root, *root.children(recursive=True)]:
        try:
            cmd = " ".join(p.cmdline())
            maps = Path(f"/proc/{p.pid}/maps").read_text()
        except (psutil.Error, OSError):
            continue
        if p.pid == pid:
            role = "bentoml serve"  # the arbiter; it imports the service too, so ORT is mapped
        elif "onnxruntime_pybind11_state" in maps:
            role = "model worker"
        else:
            role = cmd.split(" -m ", 1)[-1].split()[0] if " -m " in cmd else p.name()
        roles[p.pid] = role
    return roles


def rss(pids: Sequence[int]) -> dict[int, int]:
    """Resident set size in bytes of each process (0 once it is gone)."""
    import psutil

    out = {}
    for pid in pids:
        try:
            out[pid] = int(psutil.Process(pid).memory_info().rss)
        except psutil.Error:
            out[pid] = 0
    return out


# --- the load --------------------------------------------------------------------------


@dataclass
class Sample:
    done: int  # requests answered when sampled
    seconds: float  # since the load started
    rss: dict[int, int]
    probe: dict[int, dict[str, float]] = field(default_factory=dict)


@dataclass
class Soak:
    concurrency: int
    requests: int
    seconds: float
    errors: int
    samples: list[Sample]
    roles: dict[int, str]

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds

    def growth(self, pid: int) -> float:
        """RSS growth of `pid` from the first sample after ready to the last."""
        first, last = self.samples[1].rss[pid], self.samples[-1].rss[pid]
        return (last - first) / first


async def soak(
    url: str,
    images: list[bytes],
    *,
    requests: int,
    concurrency: int,
    checkpoints: Sequence[int],
    sample: Callable[[int, float], Sample],
    progress: list[int] | None = None,
    timeout_s: float = 300,
) -> tuple[float, int, list[Sample]]:
    """Closed-loop POST /predict load; `sample(done, seconds)` runs at 0 and at each
    checkpoint (requests answered), and `progress[0]` follows the requests answered.
    Returns (seconds, errors, samples): answers but 200, and requests that got no answer
    (the connection failed or the answer took over `timeout_s`), each counted and the
    first few printed; the user then reconnects and goes on.

    Each user is one kept-alive connection of its own (bench.loadgen's requests and
    parser), sending its next request when its answer arrived, so the server always has
    `concurrency` requests. Not httpx's pool: with as many users as connections it
    left up to 26 of 32 requests queued in the client for up to 2.5 s while connections
    sat idle (httpcore 1.0.9 hands one idle connection to every queued request, and all
    but one retry), and a connection left idle that way for as long as uvicorn's keep-alive
    (5 s then) was closed by the server as the request went out on it.
    """
    from bench.loadgen import Answer, read_answer, upload_requests

    host, port, encoded = upload_requests(url, "/predict", images)
    marks = sorted(set(checkpoints) | {requests})
    samples = [sample(0, 0.0)]
    sent = done = errors = 0
    start = time.perf_counter()

    def answered(i: int, sent_at: float, answer: Answer | BaseException) -> None:
        nonlocal done, errors
        done += 1
        if progress is not None:
            progress[0] = done
        failed = not isinstance(answer, Answer) or answer.status != 200
        if failed:
            errors += 1
            if errors <= 3:
                what = (
                    f"answered {answer.status}: {answer.body[:200]!r}"
                    if isinstance(answer, Answer)
                    else f"got no answer: {answer!r}"
                )
                print(
                    f"request {i} (sent {sent_at - start:.1f} s into the load, "
                    f"{time.perf_counter() - sent_at:.2f} s ago) {what}"
                )
        if marks and done >= marks[0]:
            marks.pop(0)
            samples.append(sample(done, time.perf_counter() - start))

    async def user() -> None:
        nonlocal sent
        connection: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            while sent < requests:
                i = sent
                sent += 1
                if connection is None:
                    connection = await asyncio.open_connection(host, port)
                reader, writer = connection
                sent_at = time.perf_counter()
                try:
                    writer.write(encoded[i % len(encoded)])
                    answer = await asyncio.wait_for(read_answer(reader), timeout_s)
                except (OSError, asyncio.IncompleteReadError, TimeoutError) as e:
                    writer.close()
                    connection = None
                    answered(i, sent_at, e)
                    continue
                answered(i, sent_at, answer)
        finally:
            if connection is not None:
                connection[1].close()

    await asyncio.gather(*(user() for _ in range(concurrency)))
    return time.perf_counter() - start, errors, samples


# --- the optional in-process probe -------------------------------------------------------

PROBE = textwrap.dedent(
    r'''
    """Written by bench.soak --probe: reports heap statistics of this process to a file."""
    import ctypes, json, os, threading, time, tracemalloc

    _dir = os.environ.get("LANTERN_SOAK_PROBE_DIR")
    if _dir:
        tracemalloc.start(int(os.environ.get("LANTERN_SOAK_PROBE_FRAMES", "1")))

        class _MallInfo2(ctypes.Structure):
            _fields_ = [(n, ctypes.c_size_t) for n in (
                "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                "uordblks", "fordblks", "keepcost")]

        _libc = ctypes.CDLL("libc.so.6")
        _libc.mallinfo2.restype = _MallInfo2

        def _report():
            path = os.path.join(_dir, f"{os.getpid()}.json")
            while True:
                m = _libc.mallinfo2()
                current, peak = tracemalloc.get_traced_memory()
                data = {"python_heap": current, "malloc_held": m.arena + m.hblkhd,
                        "malloc_in_use": m.uordblks + m.hblkhd, "malloc_free": m.fordblks,
                        "threads": threading.active_count(), "time": time.time()}
                with open(path + ".tmp", "w") as f:
                    json.dump(data, f)
                os.replace(path + ".tmp", path)
                _compare(path)
                time.sleep(0.5)

        _state = {}

        def _compare(path):
            # The soak touches "baseline", then "compare": the biggest growth in between,
            # by the allocating line and its callers, goes to <pid>.growth.txt.
            if "base" not in _state and os.path.exists(os.path.join(_dir, "baseline")):
                _state["base"] = tracemalloc.take_snapshot()
            if "base" in _state and os.path.exists(os.path.join(_dir, "compare")):
                import gc
                before = tracemalloc.get_traced_memory()[0]
                unreachable = gc.collect()
                after = tracemalloc.get_traced_memory()[0]
                with open(path[:-5] + ".gc.txt", "w") as f:
                    f.write(f"gc.collect(): {unreachable} unreachable objects, Python heap "
                            f"{before / 2**20:.1f} -> {after / 2**20:.1f} MiB\n")
                    spans = [o for o in gc.get_objects() if type(o).__name__ == "_Span"]
                    f.write(f"{len(spans)} live SDK spans after collection\n")
                    import types
                    some = spans[len(spans) // 3 : len(spans) // 3 + 2]
                    for sp in some:
                        f.write(f"span {sp.name!r}, held by:\n")
                        obj, seen = sp, {id(spans), id(some)}
                        for depth in range(12):
                            seen.add(id(obj))
                            refs = [r for r in gc.get_referrers(obj) if id(r) not in seen
                                    and not isinstance(r, types.FrameType)]
                            del obj
                            if not refs:
                                break
                            f.write("  " * depth + " <- " + ", ".join(
                                f"{type(r).__module__}.{type(r).__qualname__}" for r in refs[:4])
                                + f" {repr(refs[0])[:100]}\n")
                            obj = refs[0]
                            refs = None
                snap = tracemalloc.take_snapshot()
                stats = snap.compare_to(_state.pop("base"), "traceback")[:12]
                with open(path[:-5] + ".growth.txt", "w") as f:
                    for st in stats:
                        f.write(f"{st.size_diff / 1024:+.0f} KiB in {st.count_diff:+d} blocks\n")
                        f.writelines(f"    {line}\n" for line in st.traceback.format()[-16:])

        threading.Thread(target=_report, name="soak-probe", daemon=True).start()
    '''
)


def probe_env(directory: Path) -> dict[str, str]:
    """Environment that makes every Python process of the server run PROBE."""
    (directory / "sitecustomize.py").write_text(PROBE)
    repo = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (str(directory), repo, os.environ.get("PYTHONPATH")) if p)
    return {"PYTHONPATH": path, "LANTERN_SOAK_PROBE_DIR": str(directory)}


def read_probe(directory: Path, pids: Sequence[int]) -> dict[int, dict[str, float]]:
    out = {}
    for pid in pids:
        with contextlib.suppress(OSError, ValueError):
            out[pid] = json.loads((directory / f"{pid}.json").read_text())
    return out


# --- running it ------------------------------------------------------------------------


def register_model(arch: str, image_size: int, work: Path) -> str:
    import torch

    from lantern.core.preprocess import PreprocessSpec
    from models.checkpoint import save_checkpoint
    from models.export import export_checkpoint
    from models.network import build_model

    torch.manual_seed(0)
    classes = [f"class{i}" for i in range(10)]
    ckpt = save_checkpoint(
        work / "soak.pt",
        build_model(arch, len(classes), weights="none"),
        architecture=arch,
        class_names=classes,
        spec=PreprocessSpec(crop_size=image_size, resize_size=image_size),
        training={"mode": "none", "dataset": "random weights (soak)"},
        metrics={"accuracy": 1 / len(classes)},
    )
    return export_checkpoint(ckpt).tag


def start_server(
    tag: str, port: int, log_path: Path, env: dict[str, str]
) -> subprocess.Popen[bytes]:
    server_env = {**os.environ, "LANTERN_MODEL": tag, **env}
    return launch_server(port, log_path, server_env, ready_timeout_s=180)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def run_soak(
    url: str,
    server_pid: int,
    *,
    requests: int,
    concurrency: int,
    images: list[bytes] | None = None,
    probe_dir: Path | None = None,
) -> Soak:
    """Soak a running server; samples at ready, 20 %, 60 % and 100 % of `requests`.

    The RSS at a checkpoint is the median of the readings taken every 0.1 s while the
    last 2 % of the requests before it were answered (200 of 10,000), so one reading
    that happens to catch a few full-HD images mid-decode, or a heap trim, does not
    decide the figure. The ready figure is one reading of the idle server.
    """
    roles = server_processes(server_pid)
    pids = sorted(roles)
    window = max(1, requests // 50)
    progress = [0]
    readings: list[tuple[int, dict[int, int]]] = []
    stopped = threading.Event()

    def read_continuously() -> None:
        while not stopped.wait(0.1):
            readings.append((progress[0], rss(pids)))

    def sample(done: int, seconds: float) -> Sample:
        probe = read_probe(probe_dir, pids) if probe_dir else {}
        if probe_dir and done == checkpoints[0]:
            (probe_dir / "baseline").touch()
        recent = [r for d, r in readings if done and done - window <= d <= done]
        recent.append(rss(pids))
        median = {pid: int(statistics.median(r[pid] for r in recent)) for pid in pids}
        return Sample(done, seconds, median, probe)

    checkpoints = [requests // 5, requests * 3 // 5]
    reader = threading.Thread(target=read_continuously, name="rss-reader", daemon=True)
    reader.start()
    try:
        seconds, errors, samples = asyncio.run(
            soak(
                url,
                images or make_jpegs(),
                requests=requests,
                concurrency=concurrency,
                checkpoints=checkpoints,
                sample=sample,
                progress=progress,
            )
        )
    finally:
        stopped.set()
        reader.join()
    if probe_dir:
        (probe_dir / "compare").touch()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(list(probe_dir.glob("*.growth.txt"))) < len(
            list(probe_dir.glob("*[0-9].json"))
        ):
            time.sleep(0.5)
        time.sleep(1)
        for path in sorted(probe_dir.glob("*.growth.txt")):
            role = roles.get(int(path.name.split(".")[0]), "?")
            if role == "model worker":
                print(f"Python heap growth since request {checkpoints[0]}, {role}:")
                print(path.read_text())
                gc_path = path.with_name(path.name.replace(".growth.txt", ".gc.txt"))
                if gc_path.exists():
                    print(gc_path.read_text())
    return Soak(concurrency, requests, seconds, errors, samples, roles)


def render(result: Soak) -> str:
    lines = [
        f"{'process':<28}" + "".join(f"{f'@{s.done}':>10}" for s in result.samples) + "  growth",
    ]
    for pid, role in result.roles.items():
        mib = "".join(f"{s.rss[pid] / MIB:>10.1f}" for s in result.samples)
        lines.append(f"{f'{role} ({pid}) RSS MiB':<28}{mib}  {result.growth(pid) * 100:+5.1f} %")
        for key in ("python_heap", "malloc_held", "malloc_in_use", "malloc_free", "threads"):
            if all(pid in s.probe for s in result.samples):
                scale = 1 if key == "threads" else MIB
                row = "".join(f"{s.probe[pid][key] / scale:>10.1f}" for s in result.samples)
                lines.append(f"{'  ' + key:<28}{row}")
    seg = [
        (b.done - a.done) / (b.seconds - a.seconds)
        for a, b in zip(result.samples[1:], result.samples[2:], strict=False)
        if b.seconds > a.seconds
    ]
    lines += [
        "",
        f"{result.requests} requests at concurrency {result.concurrency} in "
        f"{result.seconds:.1f} s: {result.throughput:.1f} req/s overall"
        + (f" ({', '.join(f'{r:.1f}' for r in seg)} req/s between samples)" if seg else "")
        + f", {result.errors} errors",
    ]
    worker = next((p for p, r in result.roles.items() if r == "model worker"), None)
    if worker is not None:
        g = result.growth(worker)
        verdict = "MET" if g < TARGET_GROWTH and not result.errors else "MISSED"
        lines.append(
            f"target: model worker RSS growth from request {result.samples[1].done} to "
            f"{result.samples[-1].done} < {TARGET_GROWTH * 100:.0f} %: {g * 100:+.1f} % {verdict}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--requests", type=int, default=10_000)
    p.add_argument("--concurrency", type=int, default=32)
    add_model_arguments(p)
    p.add_argument("--model", help="serve this registered tag from the current BENTOML_HOME")
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for `lantern serve` (repeatable), e.g. to compare settings",
    )
    p.add_argument("--probe", action="store_true", help="report Python heap and malloc stats")
    p.add_argument("--json", type=Path, help="also write the samples here")
    args = p.parse_args(argv)
    os.environ["BENTOML_DO_NOT_TRACK"] = "true"

    tag = args.model
    if tag is None:
        work = use_temporary_store("lantern-soak-")
        print(f"registering a random-weight {args.arch} at {args.image_size} px ...", flush=True)
        tag = register_model(args.arch, args.image_size, work)
    else:  # the current store; a directory for the server's log
        work = Path(tempfile.mkdtemp(prefix="lantern-soak-"))
    env = dict(e.split("=", 1) for e in args.env)
    probe_dir = None
    if args.probe:
        probe_dir = work / "probe"
        probe_dir.mkdir()
        env.update(probe_env(probe_dir))
    port = free_port()
    log_path = work / "serve.log"
    print(f"starting lantern serve {tag} ({' '.join(args.env) or 'default environment'}) ...")
    proc = start_server(tag, port, log_path, env)
    try:
        if probe_dir:
            time.sleep(1.5)  # let every process write its first report
        result = run_soak(
            f"http://127.0.0.1:{port}",
            proc.pid,
            requests=args.requests,
            concurrency=args.concurrency,
            probe_dir=probe_dir,
        )
    finally:
        stop(proc)
    print()
    print(f"memory soak: {tag}, images {', '.join(f'{w}x{h}' for w, h in SIZES[:3])} ... 1920x1080")
    print(render(result))
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "roles": result.roles,
                    "seconds": result.seconds,
                    "errors": result.errors,
                    "samples": [s.__dict__ for s in result.samples],
                },
                indent=1,
            )
        )
    worker = model_worker_pid(result)
    return 0 if worker is not None and result.growth(worker) < TARGET_GROWTH else 1


def model_worker_pid(result: Soak) -> int | None:
    return next((p for p, r in result.roles.items() if r == "model worker"), None)


if __name__ == "__main__":
    sys.exit(main())
