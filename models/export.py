"""ONNX export with a parity check against PyTorch, and registration as a bundle."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lantern.core.bundle import Bundle, save_bundle
from lantern.core.errors import DataError, ExportParityError, ModelError
from lantern.core.preprocess import PreprocessSpec
from models import quantize
from models.network import build_model

log = logging.getLogger(__name__)

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
PARITY_TOLERANCE = 1e-4
PARITY_BATCH = 4


def export_onnx(model: nn.Module, spec: PreprocessSpec, path: Path) -> Path:
    """Write `model` as ONNX with a dynamic batch axis ("input" -> "logits")."""
    model = model.eval().cpu()
    example = torch.randn(2, 3, spec.crop_size, spec.crop_size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    torch.onnx.export(
        model,
        (example,),
        str(path),
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_shapes={"x": {0: batch}},
        dynamo=True,
        external_data=False,
        verbose=False,
    )
    return path


# Modules whose 4-D output is not a convolutional feature map: global pooling to a fixed
# size (a ResNet's `avgpool` answers (N, C, 1, 1) whatever the input).
NOT_FEATURE_MAPS: tuple[type[nn.Module], ...] = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def is_feature_map_module(module: nn.Module) -> bool:
    """False for modules whose output, even when 4-D, is no convolutional feature map."""
    return not isinstance(module, NOT_FEATURE_MAPS)


def explainable_layers(model: nn.Module, input_size: int) -> list[dict[str, Any]]:
    """Every module whose output is a convolutional feature map (N, C, H, W), in the order
    the forward pass runs them: [{"name": "layer4", "shape": [C, H, W]}, ...] at the
    model's input size, measured with forward hooks on one pass of a zero image.

    These are the layers Grad-CAM, Grad-CAM++ and activations can explain; `fc`
    (N, classes) and `avgpool` (global pooling) are not among them. A module run twice in
    one pass (a ResNet block's shared `relu`) is listed where it first runs, with the
    shape of its last run: the output an explanation captures (workers.engine.LayerCapture).
    """
    found: dict[str, list[int]] = {}
    handles = []

    def recorder(name: str) -> Any:
        def record(module: nn.Module, inputs: object, output: object) -> None:
            if isinstance(output, torch.Tensor) and output.dim() == 4:
                found[name] = [int(d) for d in output.shape[1:]]

        return record

    for name, module in model.named_modules():
        if name and is_feature_map_module(module):
            handles.append(module.register_forward_hook(recorder(name)))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, input_size, input_size))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return [{"name": name, "shape": shape} for name, shape in found.items()]


def parity_max_abs_diff(
    model: nn.Module, onnx_path: Path, spec: PreprocessSpec, *, seed: int = 0
) -> float:
    """Largest |logit difference| between PyTorch and ONNX Runtime (CPU) on a random batch."""
    import onnxruntime as ort

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(PARITY_BATCH, 3, spec.crop_size, spec.crop_size, generator=g)
    with torch.inference_mode():
        expected = model.eval().cpu()(x).numpy()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy().astype(np.float32)})[0]
    return float(np.abs(got.astype(np.float32) - expected).max())


def convert_fp16(onnx_path: Path, out_path: Path) -> Path:
    """An fp16 copy of the graph for GPUs; inputs and outputs stay float32."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model16 = convert_float_to_float16(onnx.load(str(onnx_path)), keep_io_types=True)
    onnx.save(model16, str(out_path))
    return out_path


def load_checkpoint(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ModelError(f"checkpoint {path} does not exist; train one with `lantern train`")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelError(f"{path} is not a Lantern checkpoint: {e}") from None
    missing = {"model", "architecture", "class_names", "preprocessing"} - set(ckpt)
    if missing:
        raise ModelError(f"{path} is not a Lantern checkpoint (missing {sorted(missing)})")
    return ckpt


def export_checkpoint(
    checkpoint: Path,
    *,
    fp16: bool = False,
    int8: bool = False,
    calibration_data: Path | None = None,
    calibration_images: int = quantize.CALIBRATION_IMAGES,
    holdout_images: int = quantize.HOLDOUT_IMAGES,
    int8_min_agreement: float = quantize.MIN_AGREEMENT,
    int8_max_accuracy_drop: float = quantize.MAX_ACCURACY_DROP,
    tolerance: float = PARITY_TOLERANCE,
    name: str = "lantern-classifier",
    demo: str | None = None,
) -> Bundle:
    """Checkpoint -> ONNX (+ parity check) -> a new bundle version in the model store.

    `demo` (default: what the checkpoint records, see models.demo.mark_demo) marks the
    bundle as a demo: meta["demo"] is the one line that says what it knows.

    With `int8`, also a statically quantised INT8 graph calibrated on the training data
    (models.quantize); it is registered only if it passes the agreement/accuracy gate, and
    its figures (or why it was skipped or refused) are recorded as meta["int8"].
    """
    ckpt = load_checkpoint(checkpoint)
    spec = PreprocessSpec.from_dict(ckpt["preprocessing"])
    model = build_model(
        ckpt["architecture"], len(ckpt["class_names"]), weights="none", train_mode="all"
    )
    model.load_state_dict(ckpt["model"])
    model.eval()

    with tempfile.TemporaryDirectory(prefix="lantern-export-") as tmp:
        tmpdir = Path(tmp)
        onnx_path = export_onnx(model, spec, tmpdir / "model.onnx")
        diff = parity_max_abs_diff(model, onnx_path, spec)
        log.info("export parity: max |Δlogit| = %.3g (tolerance %.0e)", diff, tolerance)
        if not diff <= tolerance:
            raise ExportParityError(
                f"ONNX and PyTorch disagree: max |Δlogit| = {diff:.3g} > {tolerance:.0e}. "
                "The export is not registered."
            )
        export_info: dict[str, Any] = {
            "format": "onnx",
            "opset": _opset(onnx_path),
            "torch": torch.__version__,
            "parity_max_abs_diff": diff,
            "parity_tolerance": tolerance,
            "fp16": False,
        }
        fp16_path = None
        if fp16:
            fp16_path = convert_fp16(onnx_path, tmpdir / "model.fp16.onnx")
            export_info["fp16"] = True
            export_info["fp16_parity_max_abs_diff"] = _fp16_diff(model, fp16_path, spec)

        int8_result = None
        if int8:
            int8_result = _int8(
                onnx_path,
                tmpdir / "model.int8.onnx",
                ckpt,
                spec,
                calibration_data=calibration_data,
                calibration_images=calibration_images,
                holdout_images=holdout_images,
                min_agreement=int8_min_agreement,
                max_accuracy_drop=int8_max_accuracy_drop,
            )
            export_info["int8"] = int8_result.meta["status"]

        weights_path = tmpdir / "weights.pt"
        torch.save(ckpt["model"], weights_path)
        layers = explainable_layers(model, spec.crop_size)
        meta = {
            "architecture": ckpt["architecture"],
            "class_names": list(ckpt["class_names"]),
            "preprocessing": spec.to_dict(),
            "training": ckpt.get("training", {}),
            "metrics": ckpt.get("metrics", {}),
            "export": export_info,
            "explainable_layers": layers,
            # The other modules, so a refusal can say "not a feature map" vs "no such layer".
            "non_explainable_layers": [
                n for n, _ in model.named_modules() if n and n not in {x["name"] for x in layers}
            ],
            "source_checkpoint": str(checkpoint.resolve()),
        }
        if int8_result is not None:
            meta["int8"] = int8_result.meta
        demo = demo or ckpt.get("demo")
        if demo:
            meta["demo"] = str(demo)
        return save_bundle(
            onnx_path,
            weights_path,
            meta,
            onnx_fp16_path=fp16_path,
            onnx_int8_path=int8_result.path if int8_result else None,
            name=name,
        )


def _int8(
    onnx_path: Path,
    out_path: Path,
    ckpt: dict[str, Any],
    spec: PreprocessSpec,
    *,
    calibration_data: Path | None,
    calibration_images: int,
    holdout_images: int,
    min_agreement: float,
    max_accuracy_drop: float,
) -> quantize.Int8Result:
    """The INT8 graph with its gate, or a "skipped" record when there is no data for it."""
    try:
        calibration, holdout = quantize.calibration_sets(
            ckpt.get("training", {}),
            list(ckpt["class_names"]),
            spec,
            calibration_data=calibration_data,
            calibration_images=calibration_images,
            holdout_images=holdout_images,
        )
    except DataError as e:
        return quantize.skipped(f"no calibration data ({e})")
    return quantize.build_int8(
        onnx_path,
        out_path,
        calibration,
        holdout,
        min_agreement=min_agreement,
        max_accuracy_drop=max_accuracy_drop,
    )


def _opset(onnx_path: Path) -> int:
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return int(next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")))


def _fp16_diff(model: nn.Module, fp16_path: Path, spec: PreprocessSpec) -> float | None:
    """fp16 parity, recorded for information; fp16 graphs may only run on some providers."""
    try:
        return parity_max_abs_diff(model, fp16_path, spec)
    except Exception as e:  # CPU kernels for some fp16 ops may be missing
        log.warning("fp16 parity could not be measured on CPU: %s", e)
        return None
