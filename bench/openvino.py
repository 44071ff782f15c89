"""OpenVINO side by side with ONNX Runtime on the CPU: the same graphs, one process.

    .venv/bin/pip install openvino                (an optional benchmark dependency)
    .venv/bin/python -m bench.openvino [--out openvino.json] [--quick]

Registers the prediction benchmark's model (bench.predict.register_model: a random-weight
ResNet-50, 10 classes, 224 px, with its QDQ U8S8 INT8 graph from models/quantize.py) in
a temporary BENTOML_HOME (bench.store), then measures raw images/s at batch 1, 8 and 32 of:

- ONNX Runtime fp32 and INT8 with the service's session options (service.classifier,
  intra-op threads = usable CPUs), and as "model streams" (one single-threaded session run
  from one thread per usable CPU at once, as service.batcher can);
- OpenVINO on the fp32 graph in f32 and in bf16 (INFERENCE_PRECISION_HINT; bf16 only when
  the CPU has it), and on the same QDQ INT8 graph; each with PERFORMANCE_HINT LATENCY
  (INFERENCE_NUM_THREADS = usable CPUs, synchronous infer) and THROUGHPUT (the streams
  OpenVINO picks, its optimal number of async infer requests kept busy).

Rounds alternate (A, B, C ... then ... C, B, A) per batch size, so that load from other work
on a shared machine falls on every variant alike; a figure is the median over rounds and a
ratio the median of the per-round ratios. Then top-1 agreement, max |logit difference| and
relative error of each OpenVINO precision (and of ORT INT8) against ORT fp32 on generated
pictures. `--fp32 PATH [--int8 PATH]` measures given graphs instead (what the test does
with a tiny model). Prints one table; `--out` also writes it as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

BATCHES = (1, 8, 32)
ROUNDS = 5
SECONDS = 1.5  # per variant, batch size and round (short rounds: load moves less within one)
AGREEMENT_IMAGES = 64
FLAGS = ("avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


@dataclass
class Variant:
    """One way to run one graph: a label, its runtime and precision, and its measure."""

    label: str
    runtime: str  # "ort" | "openvino"
    graph: str  # "fp32" | "int8": the graph it runs
    precision: str  # what it computes in: fp32, bf16, int8
    measure: Callable[[np.ndarray, float], float]  # (batch, seconds) -> images/s
    logits: Callable[[np.ndarray], np.ndarray] | None = None
    config: dict[str, Any] = field(default_factory=dict)
    rates: dict[int, list[float]] = field(default_factory=dict)


def cpu_info() -> dict[str, Any]:
    from bench.predict import cpuinfo
    from service.classifier import usable_cpus

    info = cpuinfo()
    model = info.get("model name") or platform.processor() or platform.machine()
    flags = set(info.get("flags", "").split())

    return {"model": model, "cpus": usable_cpus(), "flags": {f: f in flags for f in FLAGS}}


def has_bf16(info: dict[str, Any], capabilities: list[str]) -> bool:
    flags = info["flags"]
    return "BF16" in capabilities and (flags["amx_bf16"] or flags["avx512_bf16"])


# --- ONNX Runtime -----------------------------------------------------------------------


def ort_variants(graph: str, path: Path) -> list[Variant]:
    """The service's session (intra-op threads = usable CPUs) and its model streams."""
    from bench.predict import streams_rate, time_batches
    from service.classifier import create_session, run, usable_cpus

    cpus = usable_cpus()
    session = create_session(path, provider="cpu")
    single = create_session(path, provider="cpu", threads=1)

    def sync(batch: np.ndarray, seconds: float) -> float:
        return time_batches(lambda _: run(session, batch), batch.shape[0], seconds, 1)[0]

    def streams(batch: np.ndarray, seconds: float) -> float:
        return streams_rate(single, batch, cpus, seconds)[0]

    name = graph.upper() if graph == "int8" else graph
    return [
        Variant(
            f"ORT {name} ({cpus} threads)",
            "ort",
            graph,
            graph,
            sync,
            lambda x: run(session, x),
            {"intra_op_threads": cpus},
        ),
        Variant(
            f"ORT {name} streams ({cpus}x1 thread)",
            "ort",
            graph,
            graph,
            streams,
            config={"streams": cpus, "intra_op_threads": 1},
        ),
    ]


# --- OpenVINO ---------------------------------------------------------------------------


class OpenVINOSession:
    """A compiled OpenVINO model with the session-like call the service uses: run(batch)."""

    def __init__(self, compiled: Any) -> None:
        self.compiled = compiled
        self.request = compiled.create_infer_request()
        self.output = compiled.output(0)

    def run(self, batch: np.ndarray) -> np.ndarray:
        result = self.request.infer({0: np.ascontiguousarray(batch, dtype=np.float32)})
        return np.asarray(result[self.output], dtype=np.float32)


def compile_openvino(path: Path, precision: str, hint: str, threads: int) -> Any:
    import openvino as ov

    config: dict[str, Any] = {
        "PERFORMANCE_HINT": hint,
        # f32 must be asked for: on AMX CPUs OpenVINO's default inference precision is bf16.
        "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
    }
    if hint == "LATENCY":
        config["INFERENCE_NUM_THREADS"] = threads
    core = ov.Core()
    return core.compile_model(core.read_model(str(path)), "CPU", config)


def runtime_precisions(compiled: Any) -> dict[str, int]:
    """Convolutions and fully connected layers of the compiled graph, by the precision
    OpenVINO runs them in (u8/i8: its int8 kernels; bf16; f32)."""
    counts: dict[str, int] = {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        kind = info["layerType"].astype(str)
        if kind in ("Convolution", "FullyConnected"):
            key = f"{kind} {info['runtimePrecision'].astype(str)}"
            counts[key] = counts.get(key, 0) + 1
    return counts


def openvino_config(compiled: Any) -> dict[str, Any]:
    def prop(name: str) -> Any:
        try:
            value = compiled.get_property(name)
        except RuntimeError:
            return None
        if isinstance(value, int | float | bool):
            return value
        return value.get_type_name() if hasattr(value, "get_type_name") else str(value)

    return {
        "streams": prop("NUM_STREAMS"),
        "threads": prop("INFERENCE_NUM_THREADS"),
        "infer_requests": prop("OPTIMAL_NUMBER_OF_INFER_REQUESTS"),
        "inference_precision": prop("INFERENCE_PRECISION_HINT"),
        "cpu_pinning": prop("ENABLE_CPU_PINNING"),
        "conv_precisions": runtime_precisions(compiled),
    }


def async_rate(compiled: Any, batch: np.ndarray, seconds: float) -> float:
    """Images/s with OpenVINO's optimal number of async infer requests kept busy."""
    import openvino as ov

    n = int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
    queue = ov.AsyncInferQueue(compiled, n)
    for _ in range(n):  # warm-up: every request once
        queue.start_async({0: batch})
    queue.wait_all()
    calls = 0
    start = time.perf_counter()
    stop = start + seconds
    while calls < n or time.perf_counter() < stop:
        queue.start_async({0: batch})  # blocks while all n requests are busy
        calls += 1
    queue.wait_all()
    return calls * batch.shape[0] / (time.perf_counter() - start)


def openvino_variants(graph: str, path: Path, bf16: bool, notes: list[str]) -> list[Variant]:
    """LATENCY and THROUGHPUT compilations of the graph: f32 and bf16 for the fp32 graph."""
    from bench.predict import time_batches
    from service.classifier import usable_cpus

    cpus = usable_cpus()
    out = []
    for precision in ("fp32", "bf16") if graph == "fp32" else ("int8",):
        if precision == "bf16" and not bf16:
            notes.append("OpenVINO bf16: not measured, this CPU has no bf16 (amx_bf16/avx512_bf16)")
            continue
        name = {"fp32": "fp32", "bf16": "bf16 (fp32 graph)", "int8": "INT8"}[precision]
        for hint in ("LATENCY", "THROUGHPUT"):
            try:
                compiled = compile_openvino(path, precision, hint, cpus)
                config = openvino_config(compiled)
            except Exception as e:  # OpenVINO raises RuntimeError and its own types
                line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                notes.append(f"OpenVINO {name} {hint}: cannot compile: {line}")
                continue
            if hint == "LATENCY":
                session = OpenVINOSession(compiled)

                def sync(batch: np.ndarray, seconds: float, s: Any = session) -> float:
                    return time_batches(lambda _: s.run(batch), batch.shape[0], seconds, 1)[0]

                label = f"OV {name} LATENCY ({config['threads']} threads)"
                out.append(Variant(label, "openvino", graph, precision, sync, session.run, config))
            else:

                def queued(batch: np.ndarray, seconds: float, c: Any = compiled) -> float:
                    return async_rate(c, batch, seconds)

                label = (
                    f"OV {name} THROUGHPUT ({config['streams']} streams, "
                    f"{config['infer_requests']} requests)"
                )
                out.append(Variant(label, "openvino", graph, precision, queued, None, config))
    return out


# --- measuring --------------------------------------------------------------------------


def measure(
    variants: list[Variant], shape: tuple[int, int, int], rounds: int, seconds: float
) -> None:
    """Fill each variant's rates: per batch size, `rounds` alternating rounds."""
    rng = np.random.default_rng(0)
    for b in BATCHES:
        batch = rng.standard_normal((b, *shape), np.float32)
        for v in variants:
            v.rates[b] = []
        for r in range(rounds):
            order = variants if r % 2 == 0 else variants[::-1]
            for v in order:
                v.rates[b].append(v.measure(batch, seconds))
            print(
                f"  batch {b:>2}, round {r + 1}/{rounds}: "
                + ", ".join(f"{v.rates[b][-1]:.1f}" for v in variants),
                flush=True,
            )


def median_ratio(a: list[float], b: list[float]) -> float:
    """Median of the per-round ratios a/b (rounds paired: the same load on both)."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def agreement(variants: list[Variant], images: np.ndarray) -> dict[str, dict[str, float]]:
    """Each variant with logits against ORT fp32 (and OpenVINO INT8 against ORT INT8)."""
    by_key = {(v.runtime, v.precision): v for v in variants if v.logits is not None}

    def logits(v: Variant) -> np.ndarray:
        assert v.logits is not None
        return np.concatenate([v.logits(images[i : i + 32]) for i in range(0, len(images), 32)])

    computed = {k: logits(v) for k, v in by_key.items()}
    out = {}
    for (runtime, precision), got in computed.items():
        if (runtime, precision) == ("ort", "fp32"):
            continue
        pairs = [("ORT fp32", computed[("ort", "fp32")])]
        if (runtime, precision) == ("openvino", "int8") and ("ort", "int8") in computed:
            pairs.append(("ORT INT8", computed[("ort", "int8")]))
        for ref_name, ref in pairs:
            diff = got - ref
            rel = np.linalg.norm(diff, axis=1) / np.maximum(np.linalg.norm(ref, axis=1), 1e-12)
            key = f"{by_key[(runtime, precision)].label.split(' (')[0].split(' LATENCY')[0]}"
            out[f"{key} vs {ref_name}"] = {
                "images": len(images),
                "top1_agreement": float(np.mean(got.argmax(1) == ref.argmax(1))),
                "max_abs_diff": float(np.abs(diff).max()),
                "max_rel_error": float(rel.max()),
                "median_rel_error": float(np.median(rel)),
                "max_abs_logit": float(np.abs(ref).max()),
                # How far apart the top two classes are: small gaps flip with small errors.
                "median_top2_gap": float(np.median(np.diff(np.sort(ref, axis=1)[:, -2:], axis=1))),
            }
    return out


def pictures(count: int, size: int) -> list[Any]:
    """Generated pictures: random colour blocks resized bicubically (smooth, photo-like)."""
    from PIL import Image

    rng = np.random.default_rng(7)  # not the calibration pictures' seed (2)
    return [
        Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(
            (size * 4 // 3, size), Image.Resampling.BICUBIC
        )
        for _ in range(count)
    ]


# --- report -----------------------------------------------------------------------------


def summarise(variants: list[Variant]) -> list[dict[str, Any]]:
    rows = []
    best_ort: dict[tuple[str, int], list[float]] = {}
    for graph in ("fp32", "int8"):
        ort = [v for v in variants if v.runtime == "ort" and v.graph == graph]
        if ort:
            for b in BATCHES:
                best_ort[(graph, b)] = [
                    max(rs) for rs in zip(*(v.rates[b] for v in ort), strict=True)
                ]
    for v in variants:
        ort_sync = next(
            (u for u in variants if u.runtime == "ort" and u.graph == v.graph and u.logits), None
        )
        row: dict[str, Any] = {
            "label": v.label,
            "runtime": v.runtime,
            "graph": v.graph,
            "precision": v.precision,
            "config": v.config,
            "rounds": {str(b): v.rates[b] for b in BATCHES},
            "images_per_s": {str(b): statistics.median(v.rates[b]) for b in BATCHES},
        }
        if ort_sync is not None:
            row["vs_ort"] = {str(b): median_ratio(v.rates[b], ort_sync.rates[b]) for b in BATCHES}
            row["vs_best_ort"] = {
                str(b): median_ratio(v.rates[b], best_ort[(v.graph, b)]) for b in BATCHES
            }
        rows.append(row)
    return rows


def render(result: dict[str, Any]) -> str:
    info = result["cpu"]
    flags = ", ".join(f"{f} {'yes' if on else 'no'}" for f, on in info["flags"].items())
    lines = [
        f"machine: {info['cpus']} CPUs ({info['model']}); {flags}",
        f"versions: onnxruntime {result['versions']['onnxruntime']}, "
        f"openvino {result['versions']['openvino']}, Python {result['versions']['python']}",
        f"graphs: {result['graphs']}",
        f"1-minute load average: {result['load'][0]:.2f} at the start, "
        f"{result['load'][1]:.2f} at the end; {result['rounds']} alternating rounds of "
        f"{result['seconds']:g} s per variant and batch size",
        "",
        f"{'raw images/s (median of rounds)':<58}"
        + "".join(f"{'b' + str(b):>8}" for b in BATCHES)
        + "   x ORT same graph (2 threads)   x best ORT",
    ]
    for row in result["rows"]:
        rates = "".join(f"{row['images_per_s'][str(b)]:>8.1f}" for b in BATCHES)
        ratios = ""
        if "vs_ort" in row:
            ratios = "   " + " ".join(f"{row['vs_ort'][str(b)]:>5.2f}x" for b in BATCHES)
            ratios += "   " + " ".join(f"{row['vs_best_ort'][str(b)]:>5.2f}x" for b in BATCHES)
        lines.append(f"  {row['label']:<56}{rates}{ratios}")
    lines += ["", "OpenVINO as compiled (streams, threads, requests, precision, convolutions):"]
    for row in result["rows"]:
        c = row["config"]
        if row["runtime"] == "openvino":
            lines.append(
                f"  {row['label']:<56} streams {c['streams']}, threads {c['threads']}, "
                f"requests {c['infer_requests']}, {c['inference_precision']}, "
                f"conv {c['conv_precisions']}"
            )
    lines += [
        "",
        f"agreement on {result['agreement_images']} generated pictures"
        f"{'':<15}top-1    max|d|   rel.err max/median   max|logit|  top-2 gap",
    ]
    for name, a in result["agreement"].items():
        lines.append(
            f"  {name:<56} {a['top1_agreement'] * 100:6.1f}%  {a['max_abs_diff']:8.2e}"
            f"   {a['max_rel_error']:8.2e} / {a['median_rel_error']:8.2e}"
            f"   {a['max_abs_logit']:9.3g}  {a['median_top2_gap']:9.3g}"
        )
    for note in result["notes"]:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--out", type=Path, help="also write the results here as JSON")
    p.add_argument("--quick", action="store_true", help="1 round of 0.3 s, 8 pictures (smoke)")
    p.add_argument("--rounds", type=int, default=ROUNDS)
    p.add_argument("--seconds", type=float, default=SECONDS, help="per variant, batch, round")
    p.add_argument("--fp32", type=Path, help="measure this fp32 ONNX graph instead")
    p.add_argument("--int8", type=Path, help="with --fp32: its INT8 graph")
    args = p.parse_args(argv)
    try:
        import openvino as ov
    except ImportError:
        print("openvino is not installed: .venv/bin/pip install openvino", file=sys.stderr)
        return 1
    import onnxruntime

    from bench.store import use_temporary_store

    store = use_temporary_store()
    try:
        return run_all(args, ov, onnxruntime.__version__, store)
    finally:
        shutil.rmtree(store, ignore_errors=True)


def run_all(args: argparse.Namespace, ov: Any, ort_version: str, store: Path) -> int:
    rounds, seconds = (1, 0.3) if args.quick else (args.rounds, args.seconds)
    count = 8 if args.quick else AGREEMENT_IMAGES
    load_start = os.getloadavg()[0]
    if args.fp32 is not None:
        import onnx

        from lantern.core.preprocess import PreprocessSpec

        fp32, int8 = args.fp32, args.int8
        dims = onnx.load(str(fp32), load_external_data=False).graph.input[0].type.tensor_type
        h = dims.shape.dim[2].dim_value
        spec = PreprocessSpec(crop_size=h, resize_size=h)
    else:
        from bench.predict import register_model
        from lantern.core.bundle import load_bundle

        tmp = store / "work"
        tmp.mkdir(parents=True, exist_ok=True)
        print("registering a random-weight ResNet-50 (+ INT8 graph) ...", flush=True)
        bundle = load_bundle(register_model(tmp))
        fp32, int8, spec = bundle.onnx_path, bundle.onnx_int8_path, bundle.preprocess
    info = cpu_info()
    notes: list[str] = []
    capabilities = list(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    print("compiling ONNX Runtime sessions and OpenVINO models ...", flush=True)
    bf16 = has_bf16(info, capabilities)
    # Grouped by graph, so that each OpenVINO variant runs close in time to the ONNX Runtime
    # figures it is compared with.
    variants = []
    for graph, path in (("fp32", fp32), ("int8", int8)):
        if path is not None:
            variants += ort_variants(graph, path) + openvino_variants(graph, path, bf16, notes)
    images = spec.apply_batch(pictures(count, spec.crop_size))
    print("measuring (images/s per variant, in this order):", flush=True)
    for v in variants:
        print(f"  {v.label}", flush=True)
    measure(variants, tuple(images.shape[1:]), rounds, seconds)
    result = {
        "cpu": info,
        "openvino_capabilities": capabilities,
        "versions": {
            "onnxruntime": ort_version,
            "openvino": ov.__version__.split("-")[0],
            "openvino_build": ov.__version__,
            "python": platform.python_version(),
        },
        "graphs": {"fp32": str(fp32), "int8": str(int8) if int8 else None},
        "rounds": rounds,
        "seconds": seconds,
        "batches": list(BATCHES),
        "rows": summarise(variants),
        "agreement_images": count,
        "agreement": agreement(variants, images),
        "notes": notes,
        "load": [load_start, os.getloadavg()[0]],
    }
    print()
    print(render(result))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
