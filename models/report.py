"""The training report: loss/accuracy curves, the confusion matrix and `report.md`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator


def plot_curves(history: list[dict[str, Any]], path: Path) -> Path:
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for split, style in (("train", "-o"), ("val", "--s")):
        ax_loss.plot(epochs, [h[split]["loss"] for h in history], style, label=split)
        ax_acc.plot(epochs, [h[split]["accuracy"] for h in history], style, label=split)
    ax_loss.set(title="loss", xlabel="epoch")
    ax_acc.set(title="accuracy", xlabel="epoch", ylim=(0, 1))
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs 1, 2, 3; never 1.5
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_confusion(confusion: np.ndarray, classes: list[str], path: Path) -> Path:
    n = len(classes)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * n, 1.0 + 0.6 * n))
    ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set(xlabel="predicted", ylabel="true", title="confusion (validation)")
    peak = confusion.max() or 1
    for i in range(n):
        for j in range(n):
            colour = "white" if confusion[i, j] > peak / 2 else "black"
            ax.text(j, i, str(confusion[i, j]), ha="center", va="center", color=colour, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_run_report(summary: dict[str, Any], path: Path) -> Path:
    """One run in a page: what was trained on what, what was transferred, how it did."""
    r, t, timing = summary["reproduce"], summary["transfer"], summary["timing"]
    lines = [
        f"# {Path(summary['run_dir']).name}",
        "",
        f"- model: {r['arch']}, mode `{r['mode']}`, weights `{r['weights']}`",
        f"- data: {r['data']['source']}, {summary['training']['train_images']} train / "
        f"{summary['training']['val_images']} val images, {len(summary['classes'])} classes; "
        f"augmentation {'on' if r['data']['augmentation'] else 'off'}",
        f"- optimizer: {r['optimizer']['name']} lr {r['optimizer']['lr']}, one-cycle schedule, "
        f"{r['sizes']['epochs']} epochs of batch {r['sizes']['batch_size']}, "
        f"{r['sizes']['image_size']} px, seed {r['seed']}, {r['device']}",
        f"- transferred: {describe_transfer(t)}",
        f"- best validation accuracy {100 * summary['best_val_accuracy']:.1f} % at epoch "
        f"{summary['best_epoch']} (final {100 * summary['final_val_accuracy']:.1f} %)",
        f"- {timing['seconds_per_epoch']:.3g} s per epoch, "
        f"{timing['train_images_per_s']:.0f} training images/s",
    ]
    cache = summary.get("feature_cache")
    if cache:
        how = "loaded from the cache" if cache["hit"] else "computed once and cached"
        lines.append(
            f"- head trained on backbone features {how} ({cache['seconds']:.2f} s): "
            f"`{cache['path']}`"
        )
    for w in summary.get("warnings", []):
        lines.append(f"- **warning:** {w}")
    lines += ["", "![curves](curves.png)", "", "![confusion](confusion.png)", ""]
    path.write_text("\n".join(lines))
    return path


def describe_transfer(t: dict[str, Any]) -> str:
    kind = t.get("kind")
    if kind == "none":
        return "nothing (random initialisation)"
    layers = ", ".join(t.get("layers_loaded") or []) or "nothing"
    source = t.get("source")
    classes = t.get("source_classes")
    from_ = f"{source}" + (f" ({classes} classes)" if classes else "")
    return f"{t.get('tensors_loaded')} tensors ({layers}) from {from_}; head {t.get('head')}"


def plot_compare_curves(rows: list[dict[str, Any]], x: str, path: Path) -> Path:
    """Validation accuracy against `x` ("epoch" or "elapsed_seconds"), one line per mode."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for r in rows:
        xs = [h[x] for h in r["history"]]
        ax.plot(xs, [h["val_accuracy"] for h in r["history"]], "-o", label=r["mode"])
    if x == "epoch":
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(xlabel="epoch")
    else:
        ax.set(xlabel="wall time since the model was built (s)")
    ax.set(ylabel="validation accuracy", ylim=(0, 1), title="validation accuracy per mode")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_fraction_sweep(rows: list[dict[str, Any]], modes: list[str], path: Path) -> Path:
    """Best validation accuracy against the number of training images, one line per mode."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for mode in modes:
        mine = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["train_images"])
        ax.plot(
            [r["train_images"] for r in mine],
            [r["best_val_accuracy"] for r in mine],
            "-o",
            label=mode,
        )
    ax.set(
        xlabel="training images",
        ylabel="best validation accuracy",
        ylim=(0, 1),
        title="less data: accuracy per mode",
    )
    ax.set_xscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
