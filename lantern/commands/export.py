"""lantern export: checkpoint -> ONNX with a parity check -> a registered model bundle."""

from __future__ import annotations

import argparse
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
        help="also write an fp16 graph (experimental: nothing loads it yet)",
    )
    p.add_argument(
        "--tolerance",
        type=float,
        default=1e-4,
        help="largest acceptable |logit difference| between ONNX Runtime and PyTorch",
    )
    p.add_argument("--name", default="lantern-classifier", help="model name in the store")


def run(args: argparse.Namespace) -> int:
    from models.export import export_checkpoint

    bundle = export_checkpoint(
        args.checkpoint, fp16=args.fp16, tolerance=args.tolerance, name=args.name
    )
    export = bundle.meta["export"]
    print(
        f"registered {bundle.tag}  (parity max |Δlogit| {export['parity_max_abs_diff']:.2e}, "
        f"accuracy {_pct(bundle.accuracy)})"
    )
    return 0


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"
