"""Model sessions (ONNX Runtime with provider selection, or OpenVINO), softmax and top-k.

Torch-free. `onnxruntime-gpu` lists the CUDA provider whenever the package is installed,
even when CUDA then fails to load and the session silently falls back to the CPU; so the
provider actually in use is read back from `session.get_providers()`, never assumed.

ONNX Runtime is the runtime (`LANTERN_RUNTIME`); OpenVINO (lantern.core.openvino_runtime) is an
optional one for the CPU that runs the same ONNX graphs behind the same calls.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort

from lantern.core.bundle import Bundle, describe_int8, describe_openvino_int8
from lantern.core.cpus import usable_cpus
from lantern.core.errors import ModelError, UsageError
from lantern.core.openvino_runtime import INSTALL_HINT, OpenVINOModel, require_openvino

log = logging.getLogger("lantern.service.classifier")

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
PROVIDER_CHOICES = ("auto", "cpu", "cuda")
PRECISION_CHOICES = ("auto", "fp32", "int8", "fp16")
ONNXRUNTIME = "onnxruntime"
OPENVINO = "openvino"
RUNTIME_CHOICES = (ONNXRUNTIME, OPENVINO)


class Session(Protocol):
    """What the service calls on a model: an ONNX Runtime InferenceSession, or an
    OpenVINOModel that answers the same calls. Both take concurrent `run` calls."""

    def run(
        self,
        output_names: list[str] | None,
        input_feed: dict[str, np.ndarray],
        run_options: Any = None,
    ) -> list[Any]: ...

    def get_inputs(self) -> Sequence[Any]: ...

    def get_providers(self) -> list[str]: ...


@dataclass(frozen=True)
class Prediction:
    """The top-k classes of one image, most probable first."""

    class_indices: list[int]
    probabilities: list[float]


def create_session(
    onnx_path: Path, *, provider: str = "auto", threads: int = 0
) -> ort.InferenceSession:
    """An ONNX Runtime session on CUDA when asked for (or, with "auto", when it works).

    `threads` is the intra-op thread count; 0 means one per CPU this process may run on.
    Raises ModelError when "cuda" is demanded but the session cannot get it.
    """
    if provider not in PROVIDER_CHOICES:
        raise UsageError(
            f"ort_provider must be one of {', '.join(PROVIDER_CHOICES)}, not {provider!r}"
        )
    wants_cuda = provider == "cuda" or (
        provider == "auto" and CUDA in ort.get_available_providers()
    )
    providers = [CUDA, CPU] if wants_cuda else [CPU]
    options = session_options(threads)
    quiet = wants_cuda and provider == "auto"
    if quiet:
        # A failed CUDA load is expected on CPU hosts; keep ORT from logging it as an error.
        ort.set_default_logger_severity(4)
    try:
        session = ort.InferenceSession(str(onnx_path), options, providers=providers)
    except Exception as e:  # ORT raises its own exception types for bad graphs
        raise ModelError(f"ONNX Runtime cannot load {onnx_path}: {e}") from None
    finally:
        if quiet:
            ort.set_default_logger_severity(2)  # ORT's default: warnings and up
    got = session.get_providers()[0]
    if wants_cuda and got != CUDA and provider == "auto":
        log.info("CUDA is listed by onnxruntime-gpu but unusable here; falling back to the CPU")
    if provider == "cuda" and got != CUDA:
        raise ModelError(
            "LANTERN_ORT_PROVIDER=cuda but ONNX Runtime could not use CUDA (check the driver, "
            "CUDA and cuDNN libraries); use auto or cpu to run on the CPU"
        )
    log.info(
        "ONNX Runtime session for %s runs on %s (asked for %s; intra-op threads %s)",
        onnx_path.name,
        got,
        provider,
        options.intra_op_num_threads,
    )
    return session


def graph_path(bundle: Bundle, precision: str) -> Path:
    """The bundle's graph for an explicit precision (fp32, int8, fp16).

    Raises ModelError, saying why and what to do, when the bundle has no such graph."""
    if precision == "fp32":
        return bundle.onnx_path
    if precision == "int8":
        if bundle.onnx_int8_path is not None:
            return bundle.onnx_int8_path
        raise ModelError(
            f"LANTERN_PRECISION=int8 but model {bundle.tag} has no INT8 graph "
            f"({describe_int8(bundle.int8, missing='not built at export')}); re-export it with "
            "`lantern export` (INT8 is on by default), or set LANTERN_PRECISION to auto or fp32"
        )
    if precision == "fp16":
        if bundle.onnx_fp16_path is not None:
            return bundle.onnx_fp16_path
        raise ModelError(
            f"LANTERN_PRECISION=fp16 but model {bundle.tag} has no fp16 graph; re-export it "
            "with `lantern export --fp16`, or set LANTERN_PRECISION to auto or fp32"
        )
    raise UsageError(f"precision must be one of {', '.join(PRECISION_CHOICES)}, not {precision!r}")


def openvino_graph_path(bundle: Bundle, precision: str) -> Path:
    """graph_path for LANTERN_RUNTIME=openvino: the INT8 graph only if it also passed its
    gate as OpenVINO runs it (models.quantize.openvino_gate). Raises ModelError otherwise."""
    path = graph_path(bundle, precision)
    if precision == "int8" and bundle.openvino_int8_path is None:
        raise ModelError(
            f"LANTERN_PRECISION=int8 with LANTERN_RUNTIME=openvino but model {bundle.tag}'s "
            f"INT8 graph did not pass its gate under OpenVINO "
            f"({describe_openvino_int8(bundle.int8)}); re-export it with openvino installed "
            f"({INSTALL_HINT}), or set LANTERN_PRECISION to auto or fp32"
        )
    return path


def check_runtime(runtime: str, *, precision: str, provider: str) -> None:
    """Refuse, in one line each, what `runtime` cannot do: OpenVINO runs on the CPU only
    (so neither LANTERN_ORT_PROVIDER=cuda nor the fp16 graph, which is a CUDA graph), and
    needs the optional `openvino` package."""
    if runtime not in RUNTIME_CHOICES:
        raise UsageError(f"runtime must be one of {', '.join(RUNTIME_CHOICES)}, not {runtime!r}")
    if runtime != OPENVINO:
        return
    if provider == "cuda":
        raise UsageError(
            "LANTERN_ORT_PROVIDER=cuda but LANTERN_RUNTIME=openvino runs on the CPU; set "
            "LANTERN_ORT_PROVIDER to auto or cpu, or LANTERN_RUNTIME=onnxruntime for CUDA"
        )
    if precision == "fp16":
        raise UsageError(
            "LANTERN_PRECISION=fp16 selects the CUDA graph but LANTERN_RUNTIME=openvino runs "
            "on the CPU; use auto, fp32 or int8, or LANTERN_RUNTIME=onnxruntime for CUDA"
        )
    require_openvino()


def open_model(
    bundle: Bundle,
    *,
    precision: str = "auto",
    provider: str = "auto",
    threads: int = 0,
    runtime: str = ONNXRUNTIME,
) -> tuple[Session, str]:
    """(session, precision it runs) for the fastest graph of `bundle` that is allowed.

    auto: fp16 when the bundle has an fp16 graph and the session really gets CUDA; else
    INT8 when the bundle has one that passed its gate and the session runs on the CPU (a
    quantised graph is a CPU optimisation); else fp32. An explicit precision the bundle
    cannot satisfy raises ModelError before anything is loaded. With the OpenVINO
    runtime (CPU only): auto is INT8 when the bundle has it, else fp32; the graph that
    passed the INT8 gate (checked with ONNX Runtime at export) is served as is.
    """
    check_runtime(runtime, precision=precision, provider=provider)
    if runtime == OPENVINO:
        if precision == "auto":
            precision = "int8" if bundle.openvino_int8_path is not None else "fp32"
            if precision == "fp32" and bundle.onnx_int8_path is not None:
                log.warning(
                    "model %s: OpenVINO serves fp32, not the INT8 graph: its check under "
                    "OpenVINO at export: %s",
                    bundle.tag,
                    describe_openvino_int8(bundle.int8),
                )
        path = openvino_graph_path(bundle, precision)
        threads = threads if threads > 0 else usable_cpus()
        return OpenVINOModel(path, threads=threads), precision
    if precision != "auto":
        path = graph_path(bundle, precision)
        session = create_session(path, provider=provider, threads=threads)
        return session, precision
    wants_cuda = provider == "cuda" or (
        provider == "auto" and CUDA in ort.get_available_providers()
    )
    if wants_cuda and bundle.onnx_fp16_path is not None:
        session = create_session(bundle.onnx_fp16_path, provider=provider, threads=threads)
        if session.get_providers()[0] == CUDA:
            return session, "fp16"
    if bundle.onnx_int8_path is not None:
        session = create_session(bundle.onnx_int8_path, provider=provider, threads=threads)
        if session.get_providers()[0] == CPU:
            return session, "int8"
    return create_session(bundle.onnx_path, provider=provider, threads=threads), "fp32"


def create_stream_session(onnx_path: Path, *, streams: int, runtime: str = ONNXRUNTIME) -> Session:
    """The session the service's `streams` model streams share, each call on one thread of
    its own: ONNX Runtime's single-threaded session (it runs concurrent calls side by
    side), or an OpenVINO model compiled with `streams` streams of one thread each (its
    streams are what run concurrent inferences side by side). CPU only."""
    if runtime == OPENVINO:
        return OpenVINOModel(onnx_path, threads=1, streams=streams)
    return create_session(onnx_path, provider="cpu", threads=1)


def session_options(threads: int = 0) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # ResNets are a chain of convolutions: all parallelism is inside the operators.
    options.intra_op_num_threads = threads if threads > 0 else usable_cpus()
    options.inter_op_num_threads = 1
    # Idle intra-op threads spin briefly before sleeping. The service decodes images on the
    # same cores, but measured on 2 cores (BENCHMARKS.md) spinning still wins: ~5% faster
    # raw, and lower service latency at every concurrency than with spinning off.
    options.add_session_config_entry("session.intra_op.allow_spinning", "1")
    # The CPU memory arena on: activations reuse the arena's memory run after run instead
    # of fresh mappings the kernel page-faults in each time (the server's fixed mmap
    # threshold makes every block of 1 MiB or more one); 10-15 % faster on 2 cores
    # (BENCHMARKS.md "ONNX Runtime's memory arena"). The service's runs shrink it every
    # couple of seconds (service.memory.ArenaShrinker), so it does not keep the largest
    # batch's activations for good.
    options.enable_cpu_mem_arena = True
    return options


def model_streams(setting: int, provider: str) -> int:
    """How many batches the service runs at once: 1 on CUDA (the device batches), else
    the setting, 0 meaning one per usable CPU."""
    if provider == CUDA:
        return 1
    return setting if setting > 0 else usable_cpus()


def run(session: Session, batch: np.ndarray, run_options: Any = None) -> np.ndarray:
    """Logits (N, classes) for a float32 batch (N, 3, H, W). `run_options`: ONNX
    Runtime's RunOptions for this run (service.memory.ArenaShrinker's), or None."""
    name = session.get_inputs()[0].name
    feed = {name: np.ascontiguousarray(batch, dtype=np.float32)}
    logits = session.run(None, feed, run_options)[0]
    return np.asarray(logits, dtype=np.float32)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, stable for large logits (the row maximum is subtracted first)."""
    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def top_k(probabilities: np.ndarray, k: int) -> Prediction:
    """The k most probable classes of one row of probabilities (ties: lower index first)."""
    k = max(1, min(k, probabilities.shape[-1]))
    order = np.argsort(-probabilities, kind="stable")[:k]
    return Prediction(
        class_indices=[int(i) for i in order],
        probabilities=[float(probabilities[i]) for i in order],
    )
