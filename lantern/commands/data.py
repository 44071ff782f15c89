"""lantern data: write the generated shapes dataset as an ImageFolder tree."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "Write the generated shapes dataset to disk as an ImageFolder (for demos and tests)."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", type=Path, help="directory to write <class>/<n>.png into")
    p.add_argument("--per-class", type=int, default=50, help="images per class")
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from models.data import SHAPES, write_shapes_folder

    if args.per_class < 1 or args.size < 16:
        from lantern.core.errors import UsageError

        raise UsageError("--per-class must be >= 1 and --size >= 16")
    write_shapes_folder(args.out, args.per_class, args.size, args.seed)
    print(f"wrote {args.per_class * len(SHAPES)} images in {len(SHAPES)} classes to {args.out}")
    return 0
