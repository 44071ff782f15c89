"""OpenVINO inference on the CPU, behind the calls the service makes of an ONNX Runtime session.

`LANTERN_RUNTIME=openvino` (service.classifier.open_model) runs the bundle's own ONNX files
with OpenVINO instead of ONNX Runtime: no conversion step, the same graphs (fp32, or the
QDQ INT8 graph that passed its gate at export, as is). On Intel CPUs with AMX its INT8
kernels ran the same graph 2-3x faster than ONNX Runtime's (BENCHMARKS.md, "OpenVINO side
by side"); on other CPUs it may not be faster, which is why it is optional.

`openvino` is an optional dependency (`pip install 'lantern[openvino]'`) and is imported only
when a model is compiled, so the default install and the default runtime never need it.
In the core because two layers run it: the service, and the export's INT8 check under
OpenVINO (models.quantize.openvino_gate), which must compile the graph exactly as the
service does. Torch-free.
"""

from __future__ import annotations

import logging
import queue
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from lantern.core.errors import ModelError, UsageError

log = logging.getLogger("lantern.openvino")

PROVIDER = "OpenVINO CPU"
"""What `get_providers()` names: logged at startup and shown on /metrics."""

INSTALL_HINT = "pip install 'lantern[openvino]'"


def require_openvino() -> ModuleType:
    """The `openvino` module. Raises UsageError, in one line, when it is not installed."""
    try:
        import openvino
    except ImportError:
        raise UsageError(
            f"LANTERN_RUNTIME=openvino but the openvino package is not installed: "
            f"{INSTALL_HINT} (or set LANTERN_RUNTIME=onnxruntime)"
        ) from None
    return openvino


@dataclass(frozen=True)
class ModelInput:
    """The part of ONNX Runtime's NodeArg that service.classifier.run reads."""

    name: str


class OpenVINOModel:
    """One ONNX graph compiled by OpenVINO for the CPU, callable like an ONNX Runtime
    session: `run(None, {input_name: batch}) -> [outputs]`, `get_inputs()`, `get_providers()`.

    `streams` = 1: one stream over `threads` threads (PERFORMANCE_HINT LATENCY), the
    all-cores model. `streams` > 1: that many streams of one thread each, the model that the
    service's model streams share (service.batcher); several threads may call `run` at once
    and each call runs on a stream of its own.

    Thread-safe: an OpenVINO infer request runs one inference at a time, so each `run`
    takes an idle request from a pool (or creates one) and puts it back when done; the pool
    grows to the number of concurrent callers and no further.
    """

    def __init__(self, onnx_path: Path, *, threads: int, streams: int = 1) -> None:
        if threads < 1 or streams < 1:
            raise ValueError("threads and streams must be >= 1")
        ov = require_openvino()
        config: dict[str, Any] = {
            # f32 must be asked for: on CPUs with AMX or AVX512-BF16 OpenVINO's default
            # inference precision is bf16, and an "fp32" answer computed in bf16 would be a
            # lie. The INT8 graph's quantised operators still run in int8; what the QDQ
            # graph leaves unquantised stays fp32, as with ONNX Runtime.
            "INFERENCE_PRECISION_HINT": "f32",
        }
        if streams == 1:
            config["PERFORMANCE_HINT"] = "LATENCY"
            config["INFERENCE_NUM_THREADS"] = threads
        else:
            # INFERENCE_NUM_THREADS is the total over all streams: one thread per stream.
            config["NUM_STREAMS"] = streams
            config["INFERENCE_NUM_THREADS"] = streams
        core = ov.Core()
        try:
            self._compiled = core.compile_model(core.read_model(str(onnx_path)), "CPU", config)
        except Exception as e:  # OpenVINO raises RuntimeError subclasses of its own
            raise ModelError(f"OpenVINO cannot load {onnx_path}: {e}") from None
        self._inputs = [ModelInput(port.get_any_name()) for port in self._compiled.inputs]
        self._outputs = list(self._compiled.outputs)
        self._idle: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.streams = int(self._property("NUM_STREAMS"))
        self.threads = int(self._property("INFERENCE_NUM_THREADS"))
        self.inference_precision = str(self._property("INFERENCE_PRECISION_HINT"))
        log.info(
            "OpenVINO model for %s compiled for the CPU: %d stream(s), %d thread(s), "
            "inference precision %s",
            onnx_path.name,
            self.streams,
            self.threads,
            self.inference_precision,
        )

    def _property(self, name: str) -> Any:
        value = self._compiled.get_property(name)
        # Enum-like properties (the precision) come back as OpenVINO types.
        return value.get_type_name() if hasattr(value, "get_type_name") else value

    def get_inputs(self) -> list[ModelInput]:
        return list(self._inputs)

    def get_providers(self) -> list[str]:
        return [PROVIDER]

    def run(
        self,
        output_names: list[str] | None,
        input_feed: dict[str, np.ndarray],
        run_options: object = None,
    ) -> list[np.ndarray]:
        """The outputs (all of them, in graph order; `output_names` must be None) for
        `input_feed`, input name -> array, as ONNX Runtime's `run` returns them.
        `run_options` must be None: ONNX Runtime's RunOptions mean nothing to OpenVINO."""
        if run_options is not None:
            raise ValueError("OpenVINOModel.run takes no ONNX Runtime run options")
        if output_names is not None:
            raise ValueError("OpenVINOModel.run returns every output: pass None")
        try:
            request = self._idle.get_nowait()
        except queue.Empty:
            request = self._compiled.create_infer_request()
        try:
            # share_outputs=False: the arrays are copies, so the request can be reused.
            result = request.infer(input_feed, share_outputs=False)
            return [np.asarray(result[port]) for port in self._outputs]
        finally:
            self._idle.put(request)
