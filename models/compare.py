"""The transfer-learning trade-off in numbers: the same data, split, budget and seed, trained
once per mode (and per training-set fraction), in one report.

Modes: `scratch` (random weights, everything learns), `head` (frozen backbone, new head: on
cached features), `layer4` (last stage + head), `all` (full fine-tune); the last three start
from the configured `weights`. `compare(cfg, modes, fractions)` writes, under
`<out_dir>/compare-<arch>-<data>-<time>/`: `report.md` (a table per mode: best validation
accuracy, best epoch, trainable parameters, seconds per epoch, training images/s, peak
memory; and with several fractions, accuracy per mode per fraction), `compare.json`,
`accuracy_vs_epoch.png`, `accuracy_vs_time.png`, `accuracy_vs_train_size.png` (several
fractions only) and every run's own directory in `runs/`.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tqdm import tqdm

from lantern.core.errors import UsageError
from models.train import TrainConfig, data_label, main

log = logging.getLogger(__name__)

COMPARE_MODES = ("scratch", "head", "layer4", "all")


def parse_modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in modes if m not in COMPARE_MODES]
    if unknown or not modes:
        raise UsageError(
            f"unknown comparison mode(s) {', '.join(unknown) or '(none)'}; "
            f"choose from {','.join(COMPARE_MODES)}"
        )
    return list(dict.fromkeys(modes))


def parse_fractions(text: str) -> list[float]:
    try:
        fractions = sorted({float(f) for f in text.split(",") if f.strip()})
    except ValueError:
        raise UsageError(f"--fractions takes numbers such as 0.1,0.25,1.0, not {text!r}") from None
    if not fractions or not all(0 < f <= 1 for f in fractions):
        raise UsageError(f"--fractions must be in (0, 1], got {text!r}")
    return fractions


def mode_config(cfg: TrainConfig, mode: str) -> TrainConfig:
    if mode == "scratch":
        return replace(cfg, mode="all", weights="none")
    return replace(cfg, mode=mode)


def compare(
    cfg: TrainConfig, modes: list[str] | None = None, fractions: list[float] | None = None
) -> dict[str, Any]:
    """Train every mode at every fraction; write the report. Returns compare.json's content."""
    modes = list(modes or COMPARE_MODES)
    fractions = sorted(fractions or [1.0])
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    data = data_label(cfg)
    compare_dir = Path(cfg.out_dir) / f"compare-{cfg.arch}-{data}-{stamp}"
    n = 1
    while compare_dir.exists():
        n += 1
        compare_dir = Path(cfg.out_dir) / f"compare-{cfg.arch}-{data}-{stamp}-{n}"
    compare_dir.mkdir(parents=True)
    cache_dir = cfg.cache_dir or Path(cfg.out_dir) / "feature-cache"
    runs = [(f, m) for f in fractions for m in modes]
    bar = tqdm(
        total=len(runs) * cfg.epochs,
        desc="compare",
        unit="epoch",
        disable=not cfg.progress,
        file=sys.stderr,
        mininterval=0.5 if sys.stderr.isatty() else 15.0,
    )
    rows: list[dict[str, Any]] = []
    try:
        for fraction, mode in runs:
            bar.set_postfix_str(f"{mode} @ {fraction:g}")
            run_cfg = replace(
                mode_config(cfg, mode),
                train_fraction=fraction,
                out_dir=compare_dir / "runs",
                run_name=f"{mode}-{_pct(fraction)}",
                cache_dir=cache_dir,
                keep_last=False,
                resume=None,
                progress=False,  # one bar for the whole comparison, with its ETA
            )
            summary = main(run_cfg, on_epoch=lambda _entry: bar.update(1))
            rows.append(_row(mode, fraction, summary))
    finally:
        bar.close()

    result = {
        "compare_dir": str(compare_dir),
        "modes": modes,
        "fractions": fractions,
        "arch": cfg.arch,
        "weights": cfg.weights,
        "dataset": cfg.dataset,
        "epochs": cfg.epochs,
        "seed": cfg.seed,
        "rows": rows,
        "finished_at": datetime.now(UTC).isoformat(),
    }
    from models.report import plot_compare_curves, plot_fraction_sweep

    full = [r for r in rows if r["fraction"] == fractions[-1]]
    plots = {
        "accuracy_vs_epoch": plot_compare_curves(
            full, "epoch", compare_dir / "accuracy_vs_epoch.png"
        ).name,
        "accuracy_vs_time": plot_compare_curves(
            full, "elapsed_seconds", compare_dir / "accuracy_vs_time.png"
        ).name,
    }
    if len(fractions) > 1:
        path = plot_fraction_sweep(rows, modes, compare_dir / "accuracy_vs_train_size.png")
        plots["accuracy_vs_train_size"] = path.name
    result["plots"] = plots
    (compare_dir / "compare.json").write_text(json.dumps(result, indent=2))
    (compare_dir / "report.md").write_text(_markdown(result, cfg))
    result["report"] = str(compare_dir / "report.md")
    return result


def _pct(fraction: float) -> str:
    return f"{100 * fraction:g}pct"


def _row(mode: str, fraction: float, s: dict[str, Any]) -> dict[str, Any]:
    mem = s["memory"]
    return {
        "mode": mode,
        "fraction": fraction,
        "train_mode": s["training"]["mode"],
        "weights": s["training"]["weights"],
        "train_images": s["training"]["train_images"],
        "val_images": s["training"]["val_images"],
        "best_val_accuracy": s["best_val_accuracy"],
        "best_epoch": s["best_epoch"],
        "final_val_accuracy": s["final_val_accuracy"],
        "trainable_parameters": s["training"]["trainable_parameters"],
        "seconds_per_epoch": s["timing"]["seconds_per_epoch"],
        "feature_extraction_seconds": s["timing"]["feature_extraction_seconds"],
        "train_images_per_s": s["timing"]["train_images_per_s"],
        "peak_memory_mib": mem.get("peak_cuda_mib", mem["peak_rss_mib"]),
        "peak_memory_kind": "CUDA allocated" if "peak_cuda_mib" in mem else "process RSS",
        "feature_cache_hit": (s["feature_cache"] or {}).get("hit"),
        "run_dir": s["run_dir"],
        "transfer": s["transfer"].get("head"),
        "warnings": s["warnings"],
        "history": [
            {
                "epoch": h["epoch"],
                "val_accuracy": h["val"]["accuracy"],
                "elapsed_seconds": h["elapsed_seconds"],
            }
            for h in s["history"]
        ],
    }


def _markdown(result: dict[str, Any], cfg: TrainConfig) -> str:
    rows, fractions = result["rows"], result["fractions"]
    full = [r for r in rows if r["fraction"] == fractions[-1]]
    mem_kind = full[0]["peak_memory_kind"] if full else "memory"
    lines = [
        f"# Transfer-learning comparison: {cfg.arch} on {cfg.dataset}",
        "",
        f"Same data, split, budget and seed for every mode: {cfg.epochs} epochs, batch "
        f"{cfg.batch_size}, {cfg.optimizer} lr {cfg.lr} (one-cycle), {cfg.image_size} px, "
        f"seed {cfg.seed}; `scratch` starts from random weights, the other modes from "
        f"`{cfg.weights}`. `head` trains on backbone features computed once (no "
        "augmentation); its seconds per epoch exclude that one-off extraction, shown apart.",
        "",
        f"## All modes at {100 * fractions[-1]:g} % of the training data "
        f"({full[0]['train_images'] if full else 0} images, {full[0]['val_images'] if full else 0} "
        "validation images)",
        "",
        "| mode | weights | val accuracy | best epoch | trainable parameters | s/epoch "
        f"| feature extraction s | train images/s | peak memory MiB ({mem_kind}) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in full:
        extraction = f"{r['feature_extraction_seconds']:.2f}" if r["mode"] == "head" else "-"
        lines.append(
            f"| {r['mode']} | {r['weights']} | {100 * r['best_val_accuracy']:.1f} % "
            f"| {r['best_epoch']} | {r['trainable_parameters']:,} | {r['seconds_per_epoch']:.3g} "
            f"| {extraction} | {r['train_images_per_s']:.0f} | {r['peak_memory_mib']:.0f} |"
        )
    lines += [
        "",
        "![validation accuracy against epochs](accuracy_vs_epoch.png)",
        "",
        "![validation accuracy against wall time](accuracy_vs_time.png)",
        "",
    ]
    if len(fractions) > 1:
        counts = {r["fraction"]: r["train_images"] for r in rows}
        head = " | ".join(f"{100 * f:g} % ({counts[f]} images)" for f in fractions)
        lines += [
            "## Less data: best validation accuracy per mode per share of the training set",
            "",
            f"| mode | {head} |",
            "| --- |" + " ---: |" * len(fractions),
        ]
        for mode in result["modes"]:
            cells = [
                f"{100 * r['best_val_accuracy']:.1f} %"
                for f in fractions
                for r in rows
                if r["mode"] == mode and r["fraction"] == f
            ]
            lines.append(f"| {mode} | " + " | ".join(cells) + " |")
        lines += ["", "![accuracy against training-set size](accuracy_vs_train_size.png)", ""]
    warned = sorted({w for r in rows for w in r["warnings"]})
    if warned:
        lines += ["## Warnings", "", *[f"- {w}" for w in warned], ""]
    lines += [
        f"Peak memory is the {mem_kind} sampled during each run; the runs share one process, "
        "so the figures include what the process already held.",
        "",
        "Runs: " + ", ".join(f"`{Path(r['run_dir']).name}`" for r in rows),
        "",
    ]
    return "\n".join(lines)
