"""The `lantern` command line: one subcommand per module in `lantern.commands`.

Each command module defines `HELP` (one line), `add_arguments(parser)` and `run(args) -> int`,
and imports heavy libraries (torch, bentoml) only inside `run`, so `--help` is instant and
`lantern serve` never loads torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from lantern.core.errors import LanternError

# Order is the order `lantern --help` lists them in.
COMMANDS = (
    "train",
    "export",
    "models",
    "data",
    "serve",
    "worker",
    "up",
    "predict",
    "explain",
    "settings",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lantern",
        description="Lantern: image classification that shows its reasoning.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        module = importlib.import_module(f"lantern.commands.{name}")
        p = sub.add_parser(
            name,
            help=module.HELP,
            description=module.HELP,
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args._run(args) or 0)
    except LanternError as e:
        print(f"lantern {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
