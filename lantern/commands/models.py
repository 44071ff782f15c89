"""lantern models: list the registered model versions; make a first one; promote a version
to an alias the service and workers follow; delete one."""

from __future__ import annotations

import argparse
import json

HELP = (
    "List registered Lantern model versions; `ensure` makes a first one; `promote VERSION` "
    "points the production alias at a version (roll out, roll back); `delete VERSION`."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "action",
        nargs="?",
        choices=["list", "ensure", "promote", "delete"],
        default="list",
        help="list: show versions; ensure: make a first model if the store has none "
        "(CIFAR-10 fine-tune when it can be downloaded, else a demo on generated shapes); "
        "promote VERSION: point --alias at it; delete VERSION: remove it from the store",
    )
    p.add_argument("version", nargs="?", help="the version to promote or delete")
    p.add_argument("--alias", default="production", help="alias to point at VERSION (promote)")
    p.add_argument("--name", default="lantern-classifier", help="model name in the store")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    if args.action == "ensure":
        return _ensure(args.name)
    if args.action in ("promote", "delete"):
        return _change(args)
    from lantern.core.bundle import describe_int8, describe_versions

    rows = describe_versions(args.name)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no {args.name} models registered; run `lantern train` then `lantern export`")
        return 0
    header = (
        f"{'TAG':<42} {'ARCH':<9} {'CLASSES':>7} {'ACCURACY':>8} {'MODE':<6} {'DATA':<10} "
        f"{'CREATED':<19} {'INT8':<16} ALIASES"
    )
    print(header)
    for row in rows:
        acc = "n/a" if row["accuracy"] is None else f"{100 * row['accuracy']:.1f}%"
        training = row["training"]
        print(
            f"{row['tag']:<42} {row['architecture']:<9} {row['classes']:>7} {acc:>8} "
            f"{training.get('mode', '?'):<6} {training.get('dataset', '?'):<10} "
            f"{str(row['created_at'] or '')[:19]:<19} {describe_int8(row['int8']):<16} "
            f"{','.join(row['aliases']) or '-'}"
        )
    return 0


def _change(args: argparse.Namespace) -> int:
    from lantern.core.bundle import delete_bundle, promote
    from lantern.core.errors import UsageError

    if not args.version:
        raise UsageError(f"`lantern models {args.action}` needs a VERSION (see `lantern models`)")
    if args.action == "promote":
        bundle = promote(args.version, args.alias, args.name)
        print(
            f"{args.name}:{args.alias} -> {bundle.tag}; restart the API and the workers to "
            "serve it (`lantern up` and compose read it when they start)"
        )
    else:
        print(f"deleted {delete_bundle(args.version, args.name)}")
    return 0


def _ensure(name: str) -> int:
    from lantern.core.bundle import load_bundle, stored_models
    from lantern.core.errors import ModelError
    from lantern.core.settings import get_settings

    tag = get_settings().model
    try:
        bundle = load_bundle(tag)
        print(f"model {bundle.tag} is ready")
        return 0
    except ModelError as e:
        if tag.split(":")[0] != name:
            raise
        stored = len(stored_models(name))
        if stored:
            # A first model only for an empty store. Here LANTERN_MODEL names a version or
            # alias that is not there (a typo, an alias never promoted): training would
            # register a new newest version, which `production` follows.
            raise ModelError(
                f"{e}; the store has {stored} version(s) of {name}, so no first model is "
                "made: set LANTERN_MODEL to one of them (`lantern models list`) or promote "
                "one to that alias"
            ) from None
    from models.first_model import make_first_model

    bundle = make_first_model()
    print(f"registered {bundle.tag}")
    return 0
