"""lantern runs: list, compare and clean up training runs (the directories `lantern train`
writes). Reads metrics.json only: no torch, so it answers at once."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

from lantern.core.errors import UsageError

HELP = "List, compare and clean up training runs (runs/<arch>-<mode>-<data>-<time>/)."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out-dir", type=Path, default=Path("runs"), help="where runs are written")
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    ls = sub.add_parser("list", help="one line per run, newest first")
    ls.add_argument("--json", action="store_true", help="machine-readable rows")
    cmp = sub.add_parser("compare", help="runs side by side, and the settings that differ")
    cmp.add_argument("runs", nargs="+", help="run directory names (or paths)")
    clean = sub.add_parser(
        "clean", help="delete last.pt files and old runs; shows what it would do unless --yes"
    )
    clean.add_argument(
        "--keep", type=int, default=None, help="also delete all but the newest N runs"
    )
    clean.add_argument("--yes", action="store_true", help="really delete")


def run(args: argparse.Namespace) -> int:
    action = args.action or "list"
    if action == "list":
        return _list(args.out_dir, getattr(args, "json", False))
    if action == "compare":
        return _compare(args.out_dir, args.runs)
    return _clean(args.out_dir, args.keep, args.yes)


def find_runs(out_dir: Path) -> list[tuple[Path, dict[str, Any]]]:
    """(run directory, metrics.json) for every finished run, newest first; a comparison's
    member runs are listed under it."""
    if not out_dir.is_dir():
        return []
    found = []
    for metrics in out_dir.glob("*/metrics.json"):
        found += [(metrics.parent, _read(metrics))]
    for metrics in out_dir.glob("compare-*/runs/*/metrics.json"):
        found += [(metrics.parent, _read(metrics))]
    found = [(d, m) for d, m in found if m and not d.is_symlink()]
    return sorted(found, key=lambda dm: str(dm[1].get("finished_at", "")), reverse=True)


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _row(out_dir: Path, d: Path, m: dict[str, Any]) -> dict[str, Any]:
    t = m.get("training", {})
    size = sum(f.stat().st_size for f in d.iterdir() if f.is_file())
    return {
        "run": str(d.relative_to(out_dir)),
        "arch": t.get("arch") or m.get("reproduce", {}).get("arch"),
        "mode": t.get("mode"),
        "weights": t.get("weights"),
        "data": t.get("dataset"),
        "train_images": t.get("train_images"),
        "best_val_accuracy": m.get("best_val_accuracy"),
        "best_epoch": m.get("best_epoch"),
        "seconds_per_epoch": m.get("timing", {}).get("seconds_per_epoch"),
        "mib": round(size / 2**20, 1),
        "resumable": (d / "last.pt").is_file(),
        "finished_at": m.get("finished_at"),
    }


def _list(out_dir: Path, as_json: bool) -> int:
    rows = [_row(out_dir, d, m) for d, m in find_runs(out_dir)]
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no runs in {out_dir}; `lantern train` makes one")
        return 0
    head = ("RUN", "MODE", "WEIGHTS", "IMAGES", "ACCURACY", "EPOCH", "S/EPOCH", "MIB", "LAST.PT")
    table = [head] + [
        (
            r["run"],
            str(r["mode"]),
            _short(str(r["weights"])),
            str(r["train_images"]),
            f"{100 * r['best_val_accuracy']:.1f}%" if r["best_val_accuracy"] is not None else "-",
            str(r["best_epoch"] or "-"),
            f"{r['seconds_per_epoch']:.3g}" if r["seconds_per_epoch"] else "-",
            f"{r['mib']:.0f}",
            "yes" if r["resumable"] else "-",
        )
        for r in rows
    ]
    _print_table(table)
    return 0


def _compare(out_dir: Path, names: list[str]) -> int:
    runs = []
    for name in names:
        d = Path(name) if Path(name).is_dir() else out_dir / name
        m = _read(d / "metrics.json")
        if not m:
            raise UsageError(f"no finished run at {d} (no readable metrics.json)")
        runs.append((d, m))
    rows = [_row(d.parent, d, m) for d, m in runs]
    fields = ("arch", "mode", "weights", "data", "train_images", "best_epoch")
    table = [("", *[r["run"] for r in rows])]
    table += [(f, *[str(r[f]) for r in rows]) for f in fields]
    table.append(("accuracy", *[f"{100 * (r['best_val_accuracy'] or 0):.1f}%" for r in rows]))
    table.append(("s/epoch", *[f"{r['seconds_per_epoch'] or 0:.3g}" for r in rows]))
    flat = [_flatten(m.get("reproduce", {})) for _, m in runs]
    differ = sorted(
        k for k in set().union(*flat) if k != "command" and len({str(f.get(k)) for f in flat}) > 1
    )
    table += [(f"≠ {k}", *[_short(str(f.get(k))) for f in flat]) for k in differ]
    _print_table(table)
    return 0


def _clean(out_dir: Path, keep: int | None, yes: bool) -> int:
    if keep is not None and keep < 0:
        raise UsageError("--keep must be 0 or more")
    runs = find_runs(out_dir)
    latest = (out_dir / "latest").resolve() if (out_dir / "latest").exists() else None
    doomed_runs = []
    if keep is not None:
        top = [(d, m) for d, m in runs if d.parent == out_dir]  # comparisons keep their own
        doomed_runs = [d for d, _ in top[keep:] if d.resolve() != latest]
    doomed_last = [d / "last.pt" for d, _ in runs if (d / "last.pt").is_file()]
    doomed_last = [p for p in doomed_last if p.parent not in doomed_runs]
    freed = sum(p.stat().st_size for p in doomed_last) + sum(
        f.stat().st_size for d in doomed_runs for f in d.rglob("*") if f.is_file()
    )
    verb = "deleted" if yes else "would delete"
    for p in doomed_last:
        print(f"{verb} {p}")
    for d in doomed_runs:
        print(f"{verb} {d}/")
    if yes:
        for p in doomed_last:
            p.unlink()
        for d in doomed_runs:
            shutil.rmtree(d)
    print(
        f"{verb} {len(doomed_last)} last.pt file(s) and {len(doomed_runs)} run(s), "
        f"{freed / 2**20:.1f} MiB" + ("" if yes else "; add --yes to do it")
    )
    return 0


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _short(text: str, width: int = 40) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1) :]


def _print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
