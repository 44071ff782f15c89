"""lantern explain: explain a folder of images through a running Lantern service.

    lantern explain photos/ --url http://host:3000 --methods gradcam,saliency --out maps/

The work is done by lantern.batch (see there for what is written where, and how a re-run
resumes); this module reads and checks the command line.
"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "Explain images (files or folders) with a running Lantern service; save every artifact."

DEFAULT_BATCH = 16
DEFAULT_PARALLEL = 2


def add_arguments(p: argparse.ArgumentParser) -> None:
    from lantern.client import DEFAULT_URL
    from lantern.core.jobs import COMPARE_TOP_MAX, COMPARE_TOP_MIN, DEFAULT_LAYER, Method

    p.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="image files or folders")
    p.add_argument("--url", default=DEFAULT_URL, help="the Lantern service")
    p.add_argument(
        "--api-key",
        default=None,
        help="the service's API key (default: the LANTERN_API_KEY environment variable)",
    )
    p.add_argument("--out", type=Path, required=True, help="folder to write the results into")
    p.add_argument(
        "--methods",
        default=Method.GRADCAM.value,
        help=f"comma-separated, from {', '.join(m.value for m in Method)}",
    )
    p.add_argument("--layer", default=DEFAULT_LAYER, help="layer for Grad-CAM and Grad-CAM++")
    p.add_argument(
        "--activation-layer",
        default=None,
        help="layer whose activations to show (default: --layer)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH,
        help="images per job (lowered automatically to the service's limit)",
    )
    p.add_argument("--parallel", type=int, default=DEFAULT_PARALLEL, help="jobs in flight at once")
    p.add_argument(
        "--job-timeout",
        type=float,
        default=1800.0,
        help="seconds to wait for one job before giving up on the run",
    )
    p.add_argument(
        "--faithfulness",
        action="store_true",
        help="also score every map: deletion and insertion AUCs beside a random pixel order's, "
        "in each image's result.json (slower: the worker runs the perturbation curves)",
    )
    p.add_argument(
        "--compare-top",
        type=int,
        default=None,
        metavar="K",
        help=f"also explain each image's K ({COMPARE_TOP_MIN}-{COMPARE_TOP_MAX}) most probable "
        "classes, each with its own maps (ranks 2.. as <name>.<method>.rank<r>.*), listed under "
        "'compare' in result.json",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def resume_hint(args: argparse.Namespace, argv: list[str]) -> str:
    """Ctrl-C: a re-run skips every image whose result.json in --out matches (lantern.batch)."""
    from lantern.cli import rerun_command

    return (
        f"run the same command again to resume (images already explained in {args.out} "
        f"are not sent again): {rerun_command(argv)}"
    )


def run(args: argparse.Namespace) -> int:
    from lantern.batch import BatchOptions, explain_images
    from lantern.client import LanternClient, collect_images, quiet_http_logs
    from lantern.core.errors import UsageError
    from lantern.core.jobs import check_layer_name, compare_top_problem, parse_methods

    quiet_http_logs(getattr(args, "verbose", False))
    try:
        methods = [m.value for m in parse_methods(args.methods)]
        for layer in filter(None, (args.layer, args.activation_layer)):
            check_layer_name(layer)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.compare_top is not None:
        problem = compare_top_problem(args.compare_top, methods, explicit_targets=False)
        if problem is not None:
            raise UsageError(problem.replace("compare_top", "--compare-top", 1))
    if args.batch_size < 1 or args.parallel < 1:
        raise UsageError("--batch-size and --parallel must be at least 1")
    images = collect_images(args.paths, exclude=args.out)
    if not images:
        raise UsageError(f"no image files found in {', '.join(map(str, args.paths))}")
    options = BatchOptions(
        out=args.out,
        methods=methods,
        layer=args.layer,
        activation_layer=args.activation_layer,
        batch_size=args.batch_size,
        parallel=args.parallel,
        job_timeout=args.job_timeout,
        progress=not args.no_progress,
        faithfulness=args.faithfulness,
        compare_top=args.compare_top,
    )
    with LanternClient(args.url, api_key=args.api_key) as client:
        return explain_images(client, images, options)
