"""lantern predict: classify images (files or folders) through a running Lantern service.

    lantern predict photos/ --url http://host:3000 --out results/

Images go to /predict_batch in chunks. With --out, every answer is appended to
`results/predictions.csv` as soon as its chunk returns, so an interrupted run resumes: a
re-run keeps the rows already answered for the same file bytes and sends only the rest.
Without --out the predictions are printed as a table.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import Any

HELP = "Classify images (files or folders) with a running Lantern service; write a CSV."

CSV_FILE = "predictions.csv"
CSV_FIELDS = (
    "path",
    "label",
    "class_index",
    "probability",
    "top_k",
    "model_version",
    "status",
    "error",
    "sha256",
)
DEFAULT_BATCH = 16


def add_arguments(p: argparse.ArgumentParser) -> None:
    from lantern.client import DEFAULT_URL

    p.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="image files or folders")
    p.add_argument("--url", default=DEFAULT_URL, help="the Lantern service")
    p.add_argument(
        "--api-key",
        default=None,
        help="the service's API key (default: the LANTERN_API_KEY environment variable)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"folder for {CSV_FILE} (resumable); without it, print a table",
    )
    p.add_argument("--top-k", type=int, default=5, help="classes to keep per image")
    p.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH,
        help="images per request (lowered automatically to the service's limit)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def resume_hint(args: argparse.Namespace, argv: list[str]) -> str:
    """Ctrl-C: with --out, a re-run keeps the CSV's answered rows and sends only the rest."""
    from lantern.cli import rerun_command

    if args.out is None:
        return (
            "nothing was saved without --out; to make a run resumable, add --out DIR: "
            f"{rerun_command([*argv, '--out', 'predictions'])}"
        )
    return (
        f"run the same command again to resume (images already in {args.out / CSV_FILE} "
        f"are not sent again): {rerun_command(argv)}"
    )


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from lantern.client import (
        Batches,
        LanternClient,
        RequestRejected,
        collect_images,
        file_sha256,
        quiet_http_logs,
        write_csv_atomically,
    )
    from lantern.core.errors import UsageError

    quiet_http_logs(getattr(args, "verbose", False))
    if args.batch_size < 1 or args.top_k < 1:
        raise UsageError("--batch-size and --top-k must be at least 1")
    images = collect_images(args.paths, exclude=args.out)
    if not images:
        raise UsageError(f"no image files found in {', '.join(map(str, args.paths))}")
    hashes = {image.key: file_sha256(image.path) for image in images}
    csv_path = args.out / CSV_FILE if args.out else None

    # Rows answered by an earlier run for the same bytes are kept; the rest is sent again.
    earlier = _read_rows(csv_path) if csv_path else {}
    rows: dict[str, dict[str, Any]] = {}
    for image in images:
        row = earlier.get(str(image.path))
        if row and row.get("status") == "ok" and row.get("sha256") == hashes[image.key]:
            rows[image.key] = row
    todo = [image for image in images if image.key not in rows]
    already = len(rows)
    if csv_path:
        write_csv_atomically(csv_path, CSV_FIELDS, list(rows.values()))

    batches = Batches(todo, args.batch_size)
    bar = tqdm(
        total=len(images),
        initial=already,
        unit="img",
        desc="predicting",
        disable=args.no_progress or not sys.stderr.isatty(),
    )
    try:
        with LanternClient(args.url, api_key=args.api_key) as client:
            while batches:
                chunk = batches.next()
                try:
                    answers = client.predict_batch(
                        [(image.name, image.read()) for image in chunk], top_k=args.top_k
                    )
                except RequestRejected as e:
                    if not batches.rejected(chunk, e):
                        new = {chunk[0].key: _row(chunk[0], hashes, "rejected", error=e.message)}
                        _settle(rows, new, csv_path)
                        bar.update(1)
                    continue
                new = {
                    image.key: _row(image, hashes, "ok", answer)
                    for image, answer in zip(chunk, answers, strict=True)
                }
                _settle(rows, new, csv_path)
                bar.update(len(chunk))
    finally:
        bar.close()

    ordered = [rows[image.key] for image in images if image.key in rows]
    if csv_path:
        write_csv_atomically(csv_path, CSV_FIELDS, ordered)  # input order, not arrival order
    else:
        _print_table(ordered)
    bad = [row for row in ordered if row["status"] != "ok"]
    where = f"; summary in {csv_path}" if csv_path else ""
    print(
        f"predicted {len(ordered) - len(bad)} of {len(images)} image(s) "
        f"({already} from an earlier run){where}",
        file=sys.stderr if not csv_path else sys.stdout,
    )
    for row in bad:
        print(f"{row['status']}: {row['path']}: {row['error']}", file=sys.stderr)
    if bad:
        print(f"{len(bad)} image(s) were not classified; fix or remove them", file=sys.stderr)
    return 1 if bad else 0


def _row(
    image: Any,
    hashes: dict[str, str],
    status: str,
    answer: dict[str, Any] | None = None,
    error: str = "",
) -> dict[str, Any]:
    row: dict[str, Any] = {
        "path": str(image.path),
        "status": status,
        "error": error,
        "sha256": hashes[image.key],
    }
    if answer is not None:
        row.update(
            label=answer["label"],
            class_index=answer["class_index"],
            probability=f"{answer['probability']:.6f}",
            top_k=";".join(f"{e['label']}:{e['probability']:.4f}" for e in answer["top_k"]),
            model_version=answer.get("model_version", ""),
        )
    return row


def _settle(
    rows: dict[str, dict[str, Any]], new: dict[str, dict[str, Any]], csv_path: Path | None
) -> None:
    """Record answers, appending them to the CSV at once so an interruption loses nothing."""
    rows.update(new)
    if csv_path is None:
        return
    with csv_path.open("a", newline="", encoding="utf-8") as f:
        csv.DictWriter(f, fieldnames=list(CSV_FIELDS), extrasaction="ignore").writerows(
            new.values()
        )


def _read_rows(path: Path) -> dict[str, dict[str, Any]]:
    """The earlier CSV's rows by path (the last row wins), or nothing."""
    try:
        with path.open(newline="", encoding="utf-8") as f:
            return {row["path"]: row for row in csv.DictReader(f) if row.get("path")}
    except (OSError, csv.Error, KeyError):
        return {}


def _print_table(rows: list[dict[str, Any]]) -> None:
    width = max((len(row["path"]) for row in rows), default=4)
    for row in rows:
        if row["status"] == "ok":
            print(f"{row['path']:<{width}}  {row['label']:<16} {float(row['probability']):.3f}")
        else:
            print(f"{row['path']:<{width}}  {row['status'].upper()}: {row['error']}")
