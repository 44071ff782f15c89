"""GPU benchmark: fp32 vs fp16 ONNX Runtime on CUDA, the service on CUDA, explanations on CUDA.

    .venv/bin/python -m bench.gpu [--out gpu.json]      on a machine with an NVIDIA GPU
    .venv/bin/python -m bench.gpu --dry-run             the same code on the CPU, tiny sizes

Registers a ResNet-50 (random weights, 10 classes, 224 px) with its fp16 graph, as `lantern
export --fp16` writes it, in a temporary BENTOML_HOME (bench.store), then measures:

- raw ONNX Runtime images/s of the fp32 and the fp16 graph at batch 1, 8, 32 and 64: with
  `session.run()` on numpy arrays (what the service does today) and with IO binding (input
  copied to the device once, output left there), each IO-bound session once with cuDNN's
  convolution algorithm search DEFAULT and once EXHAUSTIVE; and the fp32 graph on the CPU
  provider for the GPU/CPU ratio;
- the service: `lantern serve` with LANTERN_ORT_PROVIDER=cuda, LANTERN_PRECISION=fp32 and
  then fp16, POST /predict of a 320x240 JPEG from closed-loop clients at concurrency 1, 8,
  32 and 64 (bench.predict's launcher and load loop);
- explanations: Grad-CAM + saliency + activations of layer4 from one pass of Lantern's
  engine (workers/engine.py, BatchNorm folded as the worker does) at batch 1, 8 and 32 on
  CUDA and on the CPU.

Prints one table (images/s, the fp16/fp32, IO binding/run(), EXHAUSTIVE/DEFAULT and GPU/CPU
ratios) and, with --out, writes the same figures as JSON. Refuses, with one line and exit
status 1, when there is no CUDA device or ONNX Runtime's CUDA provider does not load
(onnxruntime-gpu lists CUDA even where it cannot load it and falls back to the CPU
silently, so the provider is read back from the session). `--dry-run` runs every step on
the CPU provider and torch's CPU with a ResNet-18 at 32 px and a fraction of the requests,
to prove the script runs where there is no GPU (tests/test_bench_gpu.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

# bench.predict's launcher, load loop and timer are the ones used here.
from bench import predict
from bench.store import use_temporary_store

NUM_CLASSES = 10
CUDNN_SEARCHES = ("DEFAULT", "EXHAUSTIVE")


@dataclass(frozen=True)
class Sizes:
    arch: str
    image_size: int
    batches: tuple[int, ...]
    explain_batches: tuple[int, ...]
    concurrency: tuple[int, ...]
    requests: dict[int, int]
    budget_s: float  # timing budget per raw / explanation measurement


FULL = Sizes(
    arch="resnet50",
    image_size=224,
    batches=(1, 8, 32, 64),
    explain_batches=(1, 8, 32),
    concurrency=(1, 8, 32, 64),
    requests={1: 200, 8: 800, 32: 1600, 64: 2000},
    budget_s=3.0,
)
DRY_RUN = Sizes(
    arch="resnet18",
    image_size=32,
    batches=(1, 2),
    explain_batches=(1, 2),
    concurrency=(1, 2),
    requests={1: 4, 2: 8},
    budget_s=0.05,
)


class NoCuda(RuntimeError):
    """There is no CUDA device, or ONNX Runtime cannot use it: the one line to print."""


@dataclass
class Rate:
    """One measurement: images/s and the median time of one call."""

    what: str
    batch: int
    images_per_s: float
    ms_per_call: float


def load_average() -> float:
    return os.getloadavg()[0]


def nvidia_smi() -> str | None:
    """'name, driver, memory' of the first GPU as nvidia-smi reports it, or None."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    first = out.stdout.strip().splitlines()[:1]
    return first[0].strip() if out.returncode == 0 and first else None


def identity_graph() -> bytes:
    """A one-node ONNX graph: enough to see which provider a session gets, in milliseconds."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by every ONNX Runtime this project allows
    return bytes(model.SerializeToString())


def check_cuda() -> str:
    """The CUDA device's description; raises NoCuda saying what is missing."""
    import onnxruntime as ort
    import torch

    smi = nvidia_smi()
    if not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise NoCuda(
            "no CUDA device: torch.cuda.is_available() is False"
            + (f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else "")
            + (f", nvidia-smi sees {smi}" if smi else ", nvidia-smi finds no GPU")
            + "; `python -m bench.gpu --dry-run` runs the same code on the CPU"
        )
    session = ort.InferenceSession(
        identity_graph(), providers=["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    got = session.get_providers()[0]
    if got != "CUDAExecutionProvider":
        raise NoCuda(
            f"ONNX Runtime's CUDA provider did not load on {torch.cuda.get_device_name(0)} "
            f"(onnxruntime {ort.__version__} fell back to {got}): check that its CUDA and "
            "cuDNN libraries match the driver"
        )
    return f"{torch.cuda.get_device_name(0)} (nvidia-smi: {smi or 'not found'})"


# Run by a fresh interpreter that never imports torch, as the service's process never does:
# there ONNX Runtime has to find CUDA and cuDNN itself, which torch loads into this one.
_PROVIDER_PROBE = (
    "import sys, onnxruntime as ort; "
    "s = ort.InferenceSession(sys.stdin.buffer.read(), "
    "providers=['CUDAExecutionProvider', 'CPUExecutionProvider']); "
    "print(s.get_providers()[0])"
)


def ort_provider_without_torch() -> str:
    """The provider ONNX Runtime gives a CUDA-first session in a process without torch."""
    out = subprocess.run(
        [sys.executable, "-c", _PROVIDER_PROBE],
        input=identity_graph(),
        capture_output=True,
        timeout=120,
    )
    words = out.stdout.decode(errors="replace").split()
    if out.returncode == 0 and words:
        return words[-1]
    return "the probe failed: " + " | ".join(out.stderr.decode(errors="replace").splitlines()[-2:])


def register(sizes: Sizes, work: Path) -> str:
    """A random-weight model with its fp16 graph, exported as `lantern export --fp16` does."""
    import torch

    from lantern.core.preprocess import PreprocessSpec
    from models.checkpoint import save_checkpoint
    from models.export import export_checkpoint
    from models.network import build_model

    torch.manual_seed(0)
    model = build_model(sizes.arch, NUM_CLASSES, weights="none")
    ckpt = save_checkpoint(
        work / "bench.pt",
        model,
        architecture=sizes.arch,
        class_names=[f"class{i}" for i in range(NUM_CLASSES)],
        spec=PreprocessSpec(crop_size=sizes.image_size, resize_size=sizes.image_size),
        training={"mode": "none", "dataset": "random weights (benchmark)"},
        metrics={"accuracy": 1 / NUM_CLASSES},
    )
    return export_checkpoint(ckpt, fp16=True).tag


def ort_session(path: Path, device: str, cudnn_search: str | None) -> Any:
    """A session with the service's options on `device`; refuses a silent CPU fallback."""
    import onnxruntime as ort

    from service.classifier import CPU, CUDA, session_options

    providers: list[Any] = [CPU]
    if device == "cuda":
        providers = [(CUDA, {"device_id": 0, "cudnn_conv_algo_search": cudnn_search}), CPU]
    session = ort.InferenceSession(str(path), session_options(), providers=providers)
    want = CUDA if device == "cuda" else CPU
    if session.get_providers()[0] != want:
        raise NoCuda(f"ONNX Runtime gave {session.get_providers()[0]} for {path.name}, not {want}")
    return session


def plain_runner(session: Any, inputs: dict[int, np.ndarray]) -> Callable[[int], object]:
    """What the service does: numpy in, numpy out, copied to and from the device per call."""
    from service.classifier import run

    return lambda b: run(session, inputs[b])


def bound_runner(
    session: Any, inputs: dict[int, np.ndarray], device: str
) -> Callable[[int], object]:
    """IO binding: each batch copied to `device` once, outputs allocated there by ONNX
    Runtime, so a timed call is the graph alone (on the CPU, binding is to host memory)."""
    import onnxruntime as ort

    input_name = session.get_inputs()[0].name
    output_name = session.get_outputs()[0].name
    bindings = {}
    for b, x in inputs.items():
        value = ort.OrtValue.ortvalue_from_numpy(x, device, 0)
        binding = session.io_binding()
        binding.bind_ortvalue_input(input_name, value)
        binding.bind_output(output_name, device)
        bindings[b] = (binding, value)  # the OrtValue must outlive the binding

    def run(b: int) -> None:
        session.run_with_iobinding(bindings[b][0])

    return run


def bound_logits(session: Any, x: np.ndarray, device: str) -> np.ndarray:
    """The logits an IO-bound run of `x` on `device` returns, copied back to the host."""
    import onnxruntime as ort

    value = ort.OrtValue.ortvalue_from_numpy(x, device, 0)
    binding = session.io_binding()
    binding.bind_ortvalue_input(session.get_inputs()[0].name, value)
    binding.bind_output(session.get_outputs()[0].name, device)
    session.run_with_iobinding(binding)
    return np.asarray(binding.copy_outputs_to_cpu()[0], dtype=np.float32)


def bench_raw(tag: str, sizes: Sizes, device: str) -> tuple[list[Rate], dict[str, float]]:
    """Raw images/s of every graph x runner x cuDNN search on `device`, the fp32 graph on
    the CPU, and how far the fp16 and IO-bound logits are from plain fp32 run()."""
    from lantern.core.bundle import load_bundle
    from service.classifier import graph_path, run

    bundle = load_bundle(tag)
    rng = np.random.default_rng(0)
    shape = (3, sizes.image_size, sizes.image_size)
    inputs = {b: rng.standard_normal((b, *shape), np.float32) for b in sizes.batches}
    searches: tuple[str | None, ...] = CUDNN_SEARCHES if device == "cuda" else (None,)
    rates: list[Rate] = []
    checks: dict[str, float] = {}
    reference = None

    def measure(what: str, runner: Callable[[int], object]) -> None:
        for b in sizes.batches:
            per_s, median = predict.time_batches(runner, b, sizes.budget_s)
            rates.append(Rate(what, b, per_s, median * 1000))
        print(
            f"  {what}: "
            + ", ".join(f"{r.images_per_s:.1f}" for r in rates[-len(sizes.batches) :]),
            flush=True,
        )

    for precision in ("fp32", "fp16"):
        path = graph_path(bundle, precision)
        for search in searches:
            session = ort_session(path, device, search)
            label = f"{precision} {{}}" + (f", cuDNN {search}" if search else "")
            if search == searches[0]:
                measure(label.format("run()"), plain_runner(session, inputs))
            measure(label.format("IO binding"), bound_runner(session, inputs, device))
            probe = inputs[max(sizes.batches)]
            logits = bound_logits(session, probe, device)
            if reference is None:
                reference = run(session, probe)
            key = f"max |logit - fp32 run()|, {precision} IO binding" + (
                f" {search}" if search else ""
            )
            checks[key] = float(np.abs(logits - reference).max())
            del session
    measure("CPU fp32 run()", plain_runner(ort_session(bundle.onnx_path, "cpu", None), inputs))
    return rates, checks


def bench_explain(tag: str, sizes: Sizes, device: str, what: str) -> list[Rate]:
    """Grad-CAM + saliency + activations (layer4), one fused pass as the worker runs it."""
    import torch

    from lantern.core.bundle import load_bundle
    from models.network import build_model
    from workers.engine import explain, fold_batchnorm, normalise
    from workers.methods import Activations, GradCAM, Saliency

    bundle = load_bundle(tag)
    model = build_model(sizes.arch, NUM_CLASSES, weights="none")
    model.load_state_dict(torch.load(bundle.weights_path, map_location="cpu", weights_only=True))
    model = fold_batchnorm(model.eval()).to(device)
    methods = [GradCAM("layer4"), Saliency(), Activations("layer4")]
    g = torch.Generator().manual_seed(0)
    shape = (3, sizes.image_size, sizes.image_size)
    inputs = {b: torch.randn(b, *shape, generator=g).to(device) for b in sizes.explain_batches}

    def run(b: int) -> None:
        ex = explain(model, inputs[b], methods)
        for name in ex.results:
            normalise(ex.upsampled(name)).cpu()  # .cpu() waits for the device

    for b in sizes.explain_batches:  # the first passes pay for lazy init and kernel choice
        run(b)
    rates = []
    for b in sizes.explain_batches:
        per_s, median = predict.time_batches(run, b, sizes.budget_s)
        rates.append(Rate(what, b, per_s, median * 1000))
    print(f"  {what} ({device}): " + ", ".join(f"{r.images_per_s:.2f}" for r in rates), flush=True)
    return rates


def bench_service(
    tag: str, sizes: Sizes, device: str, precision: str, log_path: Path
) -> list[predict.LoadResult]:
    env = {
        **os.environ,
        "LANTERN_MODEL": tag,
        "LANTERN_PRECISION": precision,
        "LANTERN_ORT_PROVIDER": device,
        "LANTERN_MAX_BATCH_SIZE": str(max(sizes.batches)),
        "LANTERN_MAX_LATENCY_MS": "60000",
    }
    port = predict.free_port()
    proc = predict.launch_server(port, log_path, env, ready_timeout_s=180)
    url = f"http://127.0.0.1:{port}"
    images = predict.make_jpegs(16)
    try:
        asyncio.run(predict.load(url, images, 4, 32, precision))  # warm-up
        return [
            asyncio.run(predict.load(url, images, c, sizes.requests[c], precision))
            for c in sizes.concurrency
        ]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def last_lines(log_path: Path, count: int = 3) -> str:
    """The end of a server log (it is deleted with the temporary store at exit)."""
    try:
        lines = log_path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "no log"
    return " | ".join(line.strip() for line in lines[-count:])


def row(label: str, values: list[str]) -> str:
    return f"{label:<42}" + "".join(f"{v:>11}" for v in values)


def ratio_row(label: str, num: list[float], den: list[float]) -> str:
    return row(label, [f"{a / b:.2f}x" if b else "n/a" for a, b in zip(num, den, strict=True)])


def render(report: dict[str, Any], sizes: Sizes) -> str:
    device = report["device"]
    raw = [Rate(**r) for r in report["raw"]]
    by_what: dict[str, list[float]] = {}
    for r in raw:
        by_what.setdefault(r.what, []).append(r.images_per_s)

    def best(precision: str) -> list[float]:
        rows = [v for k, v in by_what.items() if k.startswith(f"{precision} IO binding")]
        return [max(col) for col in zip(*rows, strict=True)]

    lines = [
        f"Lantern GPU benchmark: {sizes.arch}, {sizes.image_size} px, {NUM_CLASSES} classes "
        f"(random weights), model {report['model']}",
        f"device: {report['device_name']}; ONNX Runtime in a process without torch (as the "
        f"service runs): {report['ort_provider_without_torch']}",
        f"machine: {report['machine']}; load average (1 min) at start {report['load_1min']:.2f}",
        f"onnxruntime {report['versions']['onnxruntime']}, torch {report['versions']['torch']}",
        "",
        row(f"raw ONNX Runtime on {device}, images/s", [f"batch {b}" for b in sizes.batches]),
    ]
    lines += [row(f"  {what}", [f"{v:.1f}" for v in values]) for what, values in by_what.items()]
    lines += [
        ratio_row("  fp16 / fp32 (IO binding, best search)", best("fp16"), best("fp32")),
        ratio_row(
            "  IO binding / run() (fp16)",
            best("fp16"),
            by_what[next(k for k in by_what if k.startswith("fp16 run()"))],
        ),
    ]
    if device == "cuda":
        lines.append(
            ratio_row(
                "  EXHAUSTIVE / DEFAULT (fp16 IO binding)",
                by_what["fp16 IO binding, cuDNN EXHAUSTIVE"],
                by_what["fp16 IO binding, cuDNN DEFAULT"],
            )
        )
    lines.append(
        ratio_row(f"  {device} fp16 best / CPU fp32 run()", best("fp16"), by_what["CPU fp32 run()"])
    )
    lines += [f"  {k}: {v:.3g}" for k, v in report["checks"].items()]

    for precision, why in report["service_failures"].items():
        lines += ["", f"service POST /predict, {precision} on {device}: FAILED, {why}"]
    for precision, results in report["service"].items():
        loads = [predict.LoadResult(**r) for r in results]
        lines += [
            "",
            row(
                f"service POST /predict, {precision} on {device}",
                [f"conc. {r.concurrency}" for r in loads],
            ),
            row("  throughput, images/s", [f"{r.throughput:.1f}" for r in loads]),
            row("  latency p50, ms", [f"{r.percentile(50):.1f}" for r in loads]),
            row("  latency p99, ms", [f"{r.percentile(99):.1f}" for r in loads]),
            row(
                "  mean model batch size",
                [f"{r.mean_batch:.1f}" if r.mean_batch else "n/a" for r in loads],
            ),
        ]
    if {"fp16", "fp32"} <= report["service"].keys():
        fp16, fp32 = (
            [predict.LoadResult(**r).throughput for r in report["service"][p]]
            for p in ("fp16", "fp32")
        )
        lines.append(ratio_row("  fp16 / fp32 service throughput", list(fp16), list(fp32)))

    explain_rates = [Rate(**r) for r in report["explain"]]
    on_device = [r.images_per_s for r in explain_rates if r.what == "explain"]
    on_cpu = [r.images_per_s for r in explain_rates if r.what == "explain on the CPU"]
    lines += [
        "",
        row("explanations, images/s", [f"batch {b}" for b in sizes.explain_batches]),
        "  (Grad-CAM + saliency + activations of layer4: one pass of workers/engine.py)",
        row(f"  torch on {device}", [f"{v:.2f}" for v in on_device]),
        row("  torch on the CPU", [f"{v:.2f}" for v in on_cpu]),
        ratio_row(f"  {device} / CPU", on_device, on_cpu),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda")
    p.add_argument(
        "--dry-run", action="store_true", help="the CPU, ResNet-18 at 32 px, few requests"
    )
    p.add_argument("--no-service", action="store_true", help="skip `lantern serve`")
    p.add_argument("--seconds", type=float, default=None, help="timing budget per measurement")
    p.add_argument("--out", type=Path, help="also write the figures as JSON here")
    args = p.parse_args(argv)
    device = args.device or ("cpu" if args.dry_run else "cuda")
    sizes = DRY_RUN if args.dry_run else FULL
    if args.seconds is not None:
        sizes = Sizes(**{**asdict(sizes), "budget_s": args.seconds})
    load_1min = load_average()

    try:
        device_name = check_cuda() if device == "cuda" else f"CPU ({predict.machine()})"
    except NoCuda as e:
        print(e, file=sys.stderr)
        return 1
    print(f"device: {device_name}; load average (1 min) {load_1min:.2f}", flush=True)
    without_torch = ort_provider_without_torch() if device == "cuda" else "not checked (cpu)"
    if device == "cuda" and without_torch != "CUDAExecutionProvider":
        print(
            "warning: ONNX Runtime loads CUDA in this process only because torch is loaded; "
            f"a process without torch, as the service is, gets {without_torch}",
            file=sys.stderr,
        )

    import onnxruntime as ort
    import torch

    home = use_temporary_store()
    work = home / "work"
    work.mkdir(parents=True, exist_ok=True)
    try:
        print(f"registering a random-weight {sizes.arch} with its fp16 graph ...", flush=True)
        tag = register(sizes, work)
        print("raw ONNX Runtime ...", flush=True)
        raw, checks = bench_raw(tag, sizes, device)
        service: dict[str, list[dict[str, Any]]] = {}
        service_failures: dict[str, str] = {}
        if not args.no_service:
            for precision in ("fp32", "fp16"):
                print(f"service (lantern serve), {precision} on {device} ...", flush=True)
                log_path = work / f"serve-{precision}.log"
                try:
                    results = bench_service(tag, sizes, device, precision, log_path)
                except RuntimeError as e:
                    # The service does not import torch, so CUDA may load for the raw
                    # sessions here and not there: keep why, and measure the rest.
                    service_failures[precision] = f"{e}: {last_lines(log_path)}"
                    print(f"  failed: {service_failures[precision]}", file=sys.stderr)
                    continue
                service[precision] = [asdict(r) for r in results]
        print("explanations ...", flush=True)
        explain_rates = bench_explain(tag, sizes, device, "explain")
        explain_rates += bench_explain(tag, sizes, "cpu", "explain on the CPU")
    except NoCuda as e:
        print(e, file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(home, ignore_errors=True)

    report = {
        "device": device,
        "device_name": device_name,
        "ort_provider_without_torch": without_torch,
        "machine": predict.machine(),
        "load_1min": load_1min,
        "dry_run": args.dry_run,
        "model": tag,
        "sizes": asdict(sizes),
        "versions": {"onnxruntime": ort.__version__, "torch": torch.__version__},
        "raw": [asdict(r) for r in raw],
        "checks": checks,
        "service": service,
        "service_failures": service_failures,
        "explain": [asdict(r) for r in explain_rates],
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    print()
    print(render(report, sizes))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {args.out}")
    return 1 if service_failures else 0  # the table says which and why


if __name__ == "__main__":
    sys.exit(main())
