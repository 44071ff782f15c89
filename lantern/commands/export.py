"""lantern export: checkpoint -> ONNX with a parity check -> a registered model bundle."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "Export a trained checkpoint to ONNX, check parity with PyTorch, and register it."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "checkpoint",
        type=Path,
        nargs="?",
        default=Path("runs/latest/best.pt"),
        help="checkpoint written by `lantern train`",
    )
    p.add_argument(
        "--fp16",
        action="store_true",
        help="also write an fp16 graph, for GPUs: the service runs it on CUDA when "
        "LANTERN_PRECISION is auto or fp16 (not yet measured on a GPU: BENCHMARKS.md)",
    )
    p.add_argument(
        "--int8",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also write a statically quantised INT8 graph for CPUs, calibrated on the "
        "training data and registered only if it agrees with fp32 (on by default; "
        "--no-int8 to skip)",
    )
    p.add_argument(
        "--calibration-data",
        type=Path,
        default=None,
        help="ImageFolder (one sub-folder per class; train/ and val/ used if present) for INT8 "
        "calibration and its held-out check (default: the dataset the checkpoint was trained on)",
    )
    p.add_argument(
        "--calibration-images",
        type=int,
        default=256,
        help="INT8 calibration images, stratified by class",
    )
    p.add_argument(
        "--holdout-images",
        type=int,
        default=500,
        help="held-out images the INT8 graph is checked on against fp32",
    )
    p.add_argument(
        "--int8-min-agreement",
        type=float,
        default=99.0,
        help="least top-1 agreement with fp32 (percent) for the INT8 graph to be registered",
    )
    p.add_argument(
        "--int8-max-accuracy-drop",
        type=float,
        default=1.0,
        help="most accuracy points the INT8 graph may lose against fp32",
    )
    p.add_argument(
        "--tolerance",
        type=float,
        default=1e-4,
        help="largest acceptable |logit difference| between ONNX Runtime and PyTorch",
    )
    p.add_argument("--name", default="lantern-classifier", help="model name in the store")


def run(args: argparse.Namespace) -> int:
    from lantern.core.bundle import describe_int8, describe_openvino_int8
    from models.export import export_checkpoint

    bundle = export_checkpoint(
        args.checkpoint,
        fp16=args.fp16,
        int8=args.int8,
        calibration_data=args.calibration_data,
        calibration_images=args.calibration_images,
        holdout_images=args.holdout_images,
        int8_min_agreement=args.int8_min_agreement,
        int8_max_accuracy_drop=args.int8_max_accuracy_drop,
        tolerance=args.tolerance,
        name=args.name,
    )
    export = bundle.meta["export"]
    print(
        f"registered {bundle.tag}  (parity max |Δlogit| {export['parity_max_abs_diff']:.2e}, "
        f"accuracy {_pct(bundle.accuracy)}, INT8 {describe_int8(bundle.int8, 'not built')})"
    )
    record = bundle.int8 or {}
    if record.get("status") in ("refused", "skipped"):
        print(
            f"INT8 graph {record['status'].upper()}: {record.get('reason')}. "
            f"{bundle.tag} is registered in fp32 only.",
            file=sys.stderr,
        )
    elif record.get("status") == "passed":
        # The same INT8 graph as OpenVINO runs it (LANTERN_RUNTIME=openvino).
        print(f"INT8 under OpenVINO: {describe_openvino_int8(record)}")
    return 0


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"
