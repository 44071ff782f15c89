"""lantern models: list the registered model versions."""

from __future__ import annotations

import argparse
import json

HELP = "List registered Lantern model versions with their accuracy; `ensure` makes a first one."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "action",
        nargs="?",
        choices=["list", "ensure"],
        default="list",
        help="list: show versions; ensure: make a first model if the store has none "
        "(CIFAR-10 fine-tune when it can be downloaded, else a demo on generated shapes)",
    )
    p.add_argument("--name", default="lantern-classifier", help="model name in the store")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    if args.action == "ensure":
        return _ensure(args.name)
    from lantern.core.bundle import describe_int8, list_bundles

    bundles = list_bundles(args.name)
    if args.json:
        rows = [
            {
                "tag": b.tag,
                "architecture": b.architecture,
                "classes": len(b.class_names),
                "accuracy": b.accuracy,
                "created_at": b.meta.get("created_at"),
                "training": b.meta.get("training", {}),
                "int8": b.int8,
            }
            for b in bundles
        ]
        print(json.dumps(rows, indent=2))
        return 0
    if not bundles:
        print(f"no {args.name} models registered; run `lantern train` then `lantern export`")
        return 0
    header = (
        f"{'TAG':<42} {'ARCH':<9} {'CLASSES':>7} {'ACCURACY':>8} {'MODE':<6} {'DATA':<10} "
        f"{'CREATED':<19} INT8"
    )
    print(header)
    for b in bundles:
        acc = "n/a" if b.accuracy is None else f"{100 * b.accuracy:.1f}%"
        training = b.meta.get("training", {})
        print(
            f"{b.tag:<42} {b.architecture:<9} {len(b.class_names):>7} {acc:>8} "
            f"{training.get('mode', '?'):<6} {training.get('dataset', '?'):<10} "
            f"{str(b.meta.get('created_at', ''))[:19]:<19} {describe_int8(b.int8)}"
        )
    return 0


def _ensure(name: str) -> int:
    from lantern.core.bundle import load_bundle
    from lantern.core.errors import ModelError
    from lantern.core.settings import get_settings

    tag = get_settings().model
    try:
        bundle = load_bundle(tag)
        print(f"model {bundle.tag} is ready")
        return 0
    except ModelError:
        if tag.split(":")[0] != name:
            raise
    from models.first_model import make_first_model

    bundle = make_first_model()
    print(f"registered {bundle.tag}")
    return 0
