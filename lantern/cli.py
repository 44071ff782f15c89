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
import shlex
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from lantern.core.errors import LanternError
from lantern.core.logs import configure_logging

# Order is the order `lantern --help` lists them in.
COMMANDS = (
    "train",
    "runs",
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
        p.set_defaults(_run=module.run, _resume_hint=getattr(module, "resume_hint", None))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        # One format for Lantern's, BentoML's and RQ's lines (LANTERN_LOG_FORMAT).
        configure_logging(level=logging.DEBUG if args.verbose else logging.INFO)
        return int(args._run(args) or 0)
    except LanternError as e:
        print(f"lantern {args.command}: error: {e}", file=sys.stderr)
        return 2
    except ValidationError as e:  # a bad LANTERN_* setting: say which, not a traceback
        print(f"lantern {args.command}: error: {_settings_problem(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = args._resume_hint(args, argv) if args._resume_hint else None
        print(f"lantern {args.command}: interrupted{'; ' + hint if hint else ''}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`lantern models list --json | head`): not an error of ours.
        # Point stdout at /dev/null so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def rerun_command(argv: Sequence[str]) -> str:
    """The command line that ran, ready to paste into a shell."""
    return shlex.join(["lantern", *argv])


def _settings_problem(error: ValidationError) -> str:
    """One line per invalid setting: its environment variable, the value, what is wrong."""
    problems = []
    for err in error.errors():
        field = ".".join(str(p) for p in err["loc"])
        variable = "REDIS_URL" if field == "redis_url" else f"LANTERN_{field.upper()}"
        problems.append(f"{variable}={err.get('input')!r}: {err['msg']}")
    return "invalid setting " + "; ".join(problems)


if __name__ == "__main__":
    sys.exit(main())
