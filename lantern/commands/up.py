"""lantern up: the whole system on one machine — Redis, a worker and the API."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = (
    "Run everything on this machine: Redis (unless REDIS_URL is set), a worker, the API; "
    "restart whatever exits."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="API address (0.0.0.0: all interfaces)")
    p.add_argument("--port", type=int, default=3000, help="API port")
    p.add_argument("--redis-port", type=int, default=6379, help="port of the Redis `up` starts")
    p.add_argument("--workers", type=int, default=1, help="explanation workers to start")
    p.add_argument("--data-dir", type=Path, default=Path("var"), help="Redis data, artifacts")
    p.add_argument(
        "--max-restarts",
        type=int,
        default=5,
        help="a part restarted this often within --restart-window stops everything",
    )
    p.add_argument(
        "--restart-window", type=float, default=60.0, help="seconds (see --max-restarts)"
    )


def run(args: argparse.Namespace) -> int:
    from lantern.stack import Stack

    return Stack(
        host=args.host,
        port=args.port,
        redis_port=args.redis_port,
        workers=args.workers,
        data_dir=args.data_dir,
        max_restarts=args.max_restarts,
        restart_window_s=args.restart_window,
    ).run()
