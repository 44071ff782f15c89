"""The offline demo model: transfer learning shown on generated data, in about two minutes.

Three runs, all ResNet-18 at `image_size` px with the same seed:

1. pretrain   a backbone from scratch on `shapes` (circle, square, triangle, cross),
              with plenty of generated images;
2. transfer   its backbone, new head, fine-tuned (mode `all`) on `glyphs` (star, ring,
              diamond, arrow) with only `few_shot_per_class` images per class;
3. scratch    the same few glyph images, epochs, batch, optimizer, schedule and seed, from
              random weights.

The transfer run is the demo model. Its `report.md` gets a "Transfer vs scratch" section
(and its `metrics.json` a `demo` block) with both accuracies on the same validation
images; `<out_dir>/demo-<time>/demo.json` and `demo.md` hold the same for all three runs.
No accuracy is gated: `make up` must not fail because a demo trained a little worse.

Why 128 px: ResNet-18 shrinks its input 32x, so layer4 is 4x4 at 128 px (2x2 at the old
64 px demo, where Grad-CAM was one coloured quadrant) and layer3 8x8; each step up costs
quadratically (160 px: 5x5 for 1.6x the time), and 128 px is what fits the two-minute
budget on two CPU cores. Changing the network's strides would make Grad-CAM finer but
would no longer be the torchvision ResNet-18 that export, ONNX and the workers rebuild.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from models.data import GLYPHS, SHAPES
from models.train import TrainConfig, main

log = logging.getLogger(__name__)

EVAL_COST = 1 / 3  # an evaluated image costs about a third of a trained one (no backward)


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo; the defaults are the real one, tests pass tiny ones."""

    image_size: int = 128
    pretrain_images: int = 1200
    pretrain_epochs: int = 2
    pretrain_lr: float = 0.002
    few_shot_per_class: int = 8
    finetune_epochs: int = 10
    finetune_lr: float = 0.001
    batch_size: int = 16  # pretraining
    finetune_batch_size: int = 8  # few images: smaller batches, more steps
    val_images: int = 160
    seed: int = 0
    workers: int = 0  # generated images are cheap to draw; no worker processes to start
    out_dir: Path = Path("runs")
    progress: bool = True


def describe(cfg: DemoConfig) -> str:
    """The one line that bundles, GET /model, the page and `lantern up` show."""
    return (
        f"DEMO: knows only {', '.join(GLYPHS[:-1])} and {GLYPHS[-1]} (generated images); "
        f"ResNet-18 pretrained on generated {'/'.join(SHAPES)}, fine-tuned on "
        f"{cfg.few_shot_per_class * len(GLYPHS)} glyph images"
    )


def demo_configs(cfg: DemoConfig) -> dict[str, TrainConfig]:
    """The three runs' training configs: pretrain, transfer (weights filled in later), scratch."""
    common = TrainConfig(
        arch="resnet18",
        mode="all",
        optimizer="adamw",
        batch_size=cfg.batch_size,
        image_size=cfg.image_size,
        val_size=cfg.val_images,
        seed=cfg.seed,
        workers=cfg.workers,
        out_dir=cfg.out_dir,
        progress=False,  # one bar for the whole demo, with its ETA
    )
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    few = replace(
        common,
        dataset="glyphs",
        train_size=cfg.few_shot_per_class * len(GLYPHS),
        epochs=cfg.finetune_epochs,
        lr=cfg.finetune_lr,
        batch_size=cfg.finetune_batch_size,
    )
    return {
        "pretrain": replace(
            common,
            dataset="shapes",
            weights="none",
            train_size=cfg.pretrain_images,
            epochs=cfg.pretrain_epochs,
            lr=cfg.pretrain_lr,
            run_name=f"demo-pretrain-shapes-{stamp}",
        ),
        "transfer": replace(few, weights="(pretrain)", run_name=f"demo-transfer-glyphs-{stamp}"),
        "scratch": replace(few, weights="none", run_name=f"demo-scratch-glyphs-{stamp}"),
    }


def _work(cfg: TrainConfig) -> float:
    """Image passes of a run, evaluation weighted by EVAL_COST: the progress bar's units."""
    n_train = cfg.train_size or 0
    per_epoch = (
        (n_train // cfg.batch_size) * cfg.batch_size if n_train > cfg.batch_size else n_train
    )
    return cfg.epochs * (per_epoch + EVAL_COST * (cfg.val_size or 0))


def run_demo(cfg: DemoConfig | None = None) -> dict[str, Any]:
    """Pretrain, transfer, scratch; mark the transfer run's checkpoint as the demo and write
    the comparison into its report. Returns demo.json's content (with `best_checkpoint`)."""
    cfg = cfg or DemoConfig()
    configs = demo_configs(cfg)
    started = time.perf_counter()
    bar = tqdm(
        total=math.ceil(sum(_work(c) for c in configs.values())),
        desc="demo model",
        unit="img",
        disable=not cfg.progress,
        file=sys.stderr,
        mininterval=0.5 if sys.stderr.isatty() else 10.0,
        bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining} ETA]",
    )

    def on_batch(kind: str, n: int) -> None:
        bar.update(n * (EVAL_COST if kind == "eval" else 1.0))

    summaries: dict[str, dict[str, Any]] = {}
    seconds: dict[str, float] = {}
    try:
        for stage, train_cfg in configs.items():
            if stage == "transfer":
                train_cfg = replace(train_cfg, weights=summaries["pretrain"]["best_checkpoint"])
            bar.set_description_str(f"demo model {_stage_text(stage, train_cfg)}")
            log.info("demo: %s", _stage_text(stage, train_cfg))
            t0 = time.perf_counter()
            summaries[stage] = main(train_cfg, on_batch=on_batch)
            seconds[stage] = round(time.perf_counter() - t0, 2)
            bar.refresh()
    finally:
        bar.close()
    return _record(cfg, configs, summaries, seconds, time.perf_counter() - started)


def _stage_text(stage: str, c: TrainConfig) -> str:
    if stage == "pretrain":
        return f"1/3 pretrain on {c.train_size} shapes"
    if stage == "transfer":
        return f"2/3 fine-tune that backbone on {c.train_size} glyphs"
    return f"3/3 same {c.train_size} glyphs from scratch"


def _record(
    cfg: DemoConfig,
    configs: dict[str, TrainConfig],
    summaries: dict[str, dict[str, Any]],
    seconds: dict[str, float],
    wall: float,
) -> dict[str, Any]:
    transfer, scratch = summaries["transfer"], summaries["scratch"]
    gain = transfer["best_val_accuracy"] - scratch["best_val_accuracy"]
    few = configs["transfer"]
    comparison = {
        "description": describe(cfg),
        "task": f"glyphs ({', '.join(GLYPHS)})",
        "pretrained_on": f"shapes ({', '.join(SHAPES)}), {configs['pretrain'].train_size} images",
        "pretrain_val_accuracy": summaries["pretrain"]["best_val_accuracy"],
        "few_shot_images": few.train_size,
        "val_images": few.val_size,
        "budget": {
            "epochs": few.epochs,
            "batch_size": few.batch_size,
            "optimizer": few.optimizer,
            "lr": few.lr,
            "image_size": few.image_size,
            "seed": few.seed,
        },
        "transfer_val_accuracy": transfer["best_val_accuracy"],
        "scratch_val_accuracy": scratch["best_val_accuracy"],
        "transfer_minus_scratch": gain,
        "seconds": seconds,
        "wall_seconds": round(wall, 2),
        "runs": {stage: s["run_dir"] for stage, s in summaries.items()},
    }
    # The transfer run is the demo model: its metrics, report and checkpoint say so.
    run_dir = Path(transfer["run_dir"])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics["demo"] = comparison
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    section = comparison_markdown(comparison)
    report = run_dir / "report.md"
    report.write_text(report.read_text().rstrip("\n") + "\n\n" + section)
    mark_demo(Path(transfer["best_checkpoint"]), comparison["description"])

    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    demo_dir, n = Path(cfg.out_dir) / f"demo-{stamp}", 1
    while demo_dir.exists():
        n += 1
        demo_dir = Path(cfg.out_dir) / f"demo-{stamp}-{n}"
    demo_dir.mkdir(parents=True)
    result = {
        **comparison,
        "best_checkpoint": transfer["best_checkpoint"],
        "report": str(report),
        "finished_at": datetime.now(UTC).isoformat(),
    }
    (demo_dir / "demo.json").write_text(json.dumps(result, indent=2))
    (demo_dir / "demo.md").write_text(f"# The Lantern demo model\n\n{section}")
    log.info(
        "demo: transfer %.1f %% vs scratch %.1f %% on %d glyph images (%+.1f points), %.0f s",
        100 * comparison["transfer_val_accuracy"],
        100 * comparison["scratch_val_accuracy"],
        few.val_size or 0,
        100 * gain,
        wall,
    )
    return result


def comparison_markdown(c: dict[str, Any]) -> str:
    b = c["budget"]
    verdict = (
        f"transfer beat scratch by {100 * c['transfer_minus_scratch']:.1f} points"
        if c["transfer_minus_scratch"] > 0
        else (
            "transfer did not beat scratch this time "
            f"({100 * c['transfer_minus_scratch']:+.1f} points)"
        )
    )
    s = c["seconds"]
    return "\n".join(
        [
            "## Transfer vs scratch (the demo)",
            "",
            f"{c['description']}.",
            "",
            f"A ResNet-18 backbone pretrained on {c['pretrained_on']} (validation accuracy "
            f"{100 * c['pretrain_val_accuracy']:.1f} %), then fine-tuned on only "
            f"{c['few_shot_images']} images of a task it never saw, {c['task']}; against the "
            f"same {c['few_shot_images']} images from random weights. Same budget for both: "
            f"{b['epochs']} epochs of batch {b['batch_size']}, {b['optimizer']} lr {b['lr']} "
            f"(one-cycle), {b['image_size']} px, seed {b['seed']}; accuracy on the same "
            f"{c['val_images']} validation images.",
            "",
            "| start | best validation accuracy |",
            "| --- | ---: |",
            f"| pretrained on shapes (transfer) | {100 * c['transfer_val_accuracy']:.1f} % |",
            f"| random weights (scratch) | {100 * c['scratch_val_accuracy']:.1f} % |",
            "",
            f"Result: {verdict}. Time: pretrain {s.get('pretrain', 0):.0f} s, transfer "
            f"{s.get('transfer', 0):.0f} s, scratch {s.get('scratch', 0):.0f} s "
            f"({c['wall_seconds']:.0f} s in all).",
            "",
            "Runs: " + ", ".join(f"`{Path(p).name}` ({k})" for k, p in c["runs"].items()),
            "",
        ]
    )


def mark_demo(checkpoint: Path, description: str) -> None:
    """Record `description` in the checkpoint, so that every export of it is a demo bundle."""
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    ckpt["demo"] = description
    tmp = checkpoint.with_name(f".{checkpoint.name}.tmp")
    torch.save(ckpt, tmp)
    tmp.replace(checkpoint)
