"""Make a first model when the store has none, so `make up` always has something to serve.

With network access: a short fine-tune of ImageNet ResNet-50 on CIFAR-10 (downloaded).
Without: the offline demo (models/demo.py) — a ResNet-18 pretrained on generated shapes and
fine-tuned on a few generated glyphs (star, ring, diamond, arrow), with a report of how
that compares with training on the same few images from scratch. Said loudly, and the
bundle is marked `demo`, since its predictions only know those four glyphs.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import torch

from lantern.core.bundle import Bundle
from lantern.core.errors import DataError, ModelError
from models.demo import DemoConfig, run_demo
from models.export import export_checkpoint
from models.train import TrainConfig, main

log = logging.getLogger(__name__)

BANNER = "=" * 78


def cifar10_finetune_config(data_dir: Path, out_dir: Path) -> TrainConfig:
    """ImageNet ResNet-50, layer4 + head on CIFAR-10 at 224 px: a GPU takes the full set,
    a CPU a subset that still finishes in minutes."""
    gpu = torch.cuda.is_available()
    return TrainConfig(
        dataset="cifar10",
        data_dir=data_dir,
        download=True,
        arch="resnet50",
        weights="imagenet",
        mode="layer4" if gpu else "head",
        epochs=2 if gpu else 1,
        batch_size=64 if gpu else 32,
        lr=0.01,
        image_size=224,
        train_size=None if gpu else 1500,
        val_size=2000 if gpu else 500,
        out_dir=out_dir,
    )


def make_first_model(
    data_dir: Path = Path("data"), out_dir: Path = Path("runs"), demo: DemoConfig | None = None
) -> Bundle:
    try:
        log.info("no Lantern model yet: fine-tuning ImageNet ResNet-50 on CIFAR-10")
        summary = main(cifar10_finetune_config(data_dir, out_dir))
    except (ModelError, DataError) as e:
        log.warning(
            "\n%s\nCIFAR-10 or the ImageNet weights cannot be downloaded here:\n  %s\n"
            "Training a DEMO model instead: a ResNet-18 pretrained on generated shapes, then\n"
            "fine-tuned on a few generated glyphs (star, ring, diamond, arrow); it knows\n"
            "nothing else. Its report compares that transfer with training from scratch.\n"
            "For a real model run\n"
            "  lantern train --dataset cifar10 --download   (or --dataset folder --data-dir DIR)\n"
            "  lantern export\n%s",
            BANNER,
            e,
            BANNER,
        )
        result = run_demo(replace(demo or DemoConfig(), out_dir=out_dir))
        log.info("demo report: %s", result["report"])
        return export_checkpoint(Path(result["best_checkpoint"]), int8=True)
    return export_checkpoint(Path(summary["best_checkpoint"]), int8=True)
