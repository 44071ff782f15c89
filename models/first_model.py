"""Make a first model when the store has none, so `make up` always has something to serve.

With network access: a short fine-tune of ImageNet ResNet-50 on CIFAR-10 (downloaded).
Without: a demo ResNet-18 trained from scratch on the generated shapes — said loudly, since
its predictions only know circles, squares, triangles and crosses.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from lantern.core.bundle import Bundle
from lantern.core.errors import DataError, ModelError
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


def demo_config(out_dir: Path) -> TrainConfig:
    """ResNet-18 from scratch on generated shapes at 64 px: about two minutes on 2 CPU cores."""
    return TrainConfig(
        dataset="shapes",
        arch="resnet18",
        weights="none",
        mode="all",
        epochs=4,
        batch_size=32,
        lr=0.002,
        optimizer="adamw",
        image_size=64,
        train_size=1600,
        val_size=400,
        out_dir=out_dir,
    )


def make_first_model(data_dir: Path = Path("data"), out_dir: Path = Path("runs")) -> Bundle:
    try:
        log.info("no Lantern model yet: fine-tuning ImageNet ResNet-50 on CIFAR-10")
        summary = main(cifar10_finetune_config(data_dir, out_dir))
    except (ModelError, DataError) as e:
        log.warning(
            "\n%s\nCIFAR-10 or the ImageNet weights cannot be downloaded here:\n  %s\n"
            "Training a DEMO model instead: ResNet-18 on generated shapes (circle, square,\n"
            "triangle, cross). It knows nothing else. For a real model run\n"
            "  lantern train --dataset cifar10 --download   (or --dataset folder --data-dir DIR)\n"
            "  lantern export\n%s",
            BANNER,
            e,
            BANNER,
        )
        summary = main(demo_config(out_dir))
    return export_checkpoint(Path(summary["best_checkpoint"]), int8=True)
