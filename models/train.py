"""Fine-tuning, in the shape of torchvision's classification reference:
`load_data`, `train_one_epoch`, `evaluate`, `main(config)`.

A run directory holds `best.pt` (highest validation accuracy), `last.pt`, `metrics.json`,
`curves.png` and `confusion.png`; `runs/latest` points at the newest run.
"""

from __future__ import annotations

import json
import logging
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from lantern.core.errors import UsageError
from lantern.core.preprocess import PreprocessSpec
from models import data as datasets
from models.checkpoint import save_checkpoint
from models.network import (
    build_model,
    freeze_batchnorm_statistics,
    resolve_device,
    trainable_parameter_names,
)
from models.transforms import eval_transform, train_transform

log = logging.getLogger(__name__)

DATASETS = ("shapes", "cifar10", "folder")


@dataclass
class TrainConfig:
    dataset: str = "shapes"
    data_dir: Path = Path("data")
    download: bool = False
    arch: str = "resnet50"
    weights: str = "imagenet"
    mode: str = "layer4"
    epochs: int = 3
    batch_size: int = 32
    lr: float = 0.01
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    image_size: int = 224
    resize_size: int | None = None
    device: str = "auto"
    seed: int = 0
    workers: int = 2
    train_size: int | None = None  # shapes: images to generate; others: a random subset
    val_size: int | None = None
    val_fraction: float = 0.2  # folder datasets without a val/ split
    out_dir: Path = Path("runs")
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class EpochStats:
    loss: float
    accuracy: float
    images_per_s: float


# --- data -------------------------------------------------------------------------------


def load_data(cfg: TrainConfig, spec: PreprocessSpec) -> tuple[Any, Any, list[str]]:
    """(train, val, class names) with the training and evaluation transforms applied."""
    train_tf, eval_tf = train_transform(spec), eval_transform(spec)
    train: Any
    val: Any
    if cfg.dataset == "shapes":
        n_train = cfg.train_size or 2000
        n_val = cfg.val_size or max(200, n_train // 5)
        size = cfg.image_size
        train = datasets.ShapesDataset(n_train, size=size, seed=cfg.seed, transform=train_tf)
        val = datasets.ShapesDataset(n_val, size=size, seed=cfg.seed + 10_000, transform=eval_tf)
        return train, val, list(datasets.SHAPES)
    if cfg.dataset == "cifar10":
        train = datasets.cifar10(cfg.data_dir, True, cfg.download, train_tf)
        val = datasets.cifar10(cfg.data_dir, False, cfg.download, eval_tf)
        return (
            _limit(train, cfg.train_size, cfg.seed),
            _limit(val, cfg.val_size, cfg.seed),
            list(datasets.CIFAR10_CLASSES),
        )
    if cfg.dataset == "folder":
        root = cfg.data_dir
        if (root / "train").is_dir() and (root / "val").is_dir():
            train = datasets.image_folder(root / "train", train_tf)
            val = datasets.image_folder(root / "val", eval_tf)
            if train.classes != val.classes:
                raise UsageError(f"{root}/train and {root}/val have different class folders")
        else:
            plain = datasets.image_folder(root)  # validates before splitting
            train_all: Any = datasets.image_folder(root, train_tf)
            val_all = datasets.image_folder(root, eval_tf)
            train_idx, val_idx = _split(len(plain), cfg.val_fraction, cfg.seed)
            train, val = Subset(train_all, train_idx), Subset(val_all, val_idx)
            train.classes = plain.classes
        classes = list(train.classes)
        return _limit(train, cfg.train_size, cfg.seed), _limit(val, cfg.val_size, cfg.seed), classes
    raise UsageError(f"unknown dataset {cfg.dataset!r}; choose one of {DATASETS}")


def _split(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    if not 0 < val_fraction < 1:
        raise UsageError("--val-fraction must be between 0 and 1")
    idx = list(range(n))
    random.Random(seed).shuffle(idx)
    n_val = max(1, round(n * val_fraction))
    return idx[n_val:], idx[:n_val]


def _limit(ds: Any, size: int | None, seed: int) -> Any:
    if size is None or size >= len(ds):
        return ds
    idx = random.Random(seed).sample(range(len(ds)), size)
    return Subset(ds, idx)


# --- one epoch --------------------------------------------------------------------------


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler | None,
    device: torch.device,
    epoch: int,
    progress: bool = True,
) -> EpochStats:
    """One pass over `loader`; the learning-rate schedule steps once per batch."""
    model.train()
    freeze_batchnorm_statistics(model)
    criterion = nn.CrossEntropyLoss()
    total_loss, correct, seen, start = 0.0, 0, 0, time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch} train", disable=not progress, **_tqdm_opts())
    for images, labels in bar:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        if device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.float16, enabled=scaler is not None):
            logits = model(images)
            loss = criterion(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        scheduler.step()
        n = labels.size(0)
        total_loss += loss.item() * n
        correct += int((logits.argmax(1) == labels).sum())
        seen += n
        rate = seen / (time.perf_counter() - start)
        bar.set_postfix(
            loss=f"{total_loss / seen:.3f}",
            acc=f"{correct / seen:.3f}",
            img_s=f"{rate:.0f}",
            refresh=False,
        )
    elapsed = time.perf_counter() - start
    return EpochStats(total_loss / max(seen, 1), correct / max(seen, 1), seen / elapsed)


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    num_classes: int,
    progress: bool = True,
) -> tuple[EpochStats, np.ndarray]:
    """Validation loss, accuracy, throughput and the confusion matrix (rows: true class)."""
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    total_loss, seen, start = 0.0, 0, time.perf_counter()
    for images, labels in tqdm(loader, desc="          eval", disable=not progress, **_tqdm_opts()):
        images, labels = images.to(device), labels.to(device)
        if device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
            logits = model(images)
        total_loss += float(criterion(logits.float(), labels))
        np.add.at(confusion, (labels.cpu().numpy(), logits.argmax(1).cpu().numpy()), 1)
        seen += labels.size(0)
    accuracy = float(np.trace(confusion) / max(seen, 1))
    stats = EpochStats(total_loss / max(seen, 1), accuracy, seen / (time.perf_counter() - start))
    return stats, confusion


def _tqdm_opts() -> dict[str, Any]:
    tty = sys.stderr.isatty()
    return {
        "file": sys.stderr,
        "dynamic_ncols": tty,
        "mininterval": 0.5 if tty else 15.0,
        "leave": True,
    }


# --- the run ----------------------------------------------------------------------------


def make_optimizer(cfg: TrainConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """SGD with momentum (the fine-tuning classic), or AdamW (steadier from scratch)."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise UsageError(f"unknown optimizer {cfg.optimizer!r}; choose sgd or adamw")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def main(cfg: TrainConfig) -> dict[str, Any]:
    """Train, keep the best checkpoint, write the report. Returns the metrics summary."""
    if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.lr <= 0:
        raise UsageError("--epochs, --batch-size and --lr must be positive")
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    spec = PreprocessSpec(crop_size=cfg.image_size, resize_size=cfg.resize_size or cfg.image_size)
    train_ds, val_ds, classes = load_data(cfg, spec)
    train_ds, val_ds = cast(Any, train_ds), cast(Any, val_ds)
    model = build_model(cfg.arch, len(classes), weights=cfg.weights, train_mode=cfg.mode).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg, params)
    steps = cfg.epochs * math.ceil(len(train_ds) / cfg.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg.lr, total_steps=steps, pct_start=0.15
    )
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" else None
    pin = device.type == "cuda"
    g = torch.Generator().manual_seed(cfg.seed)
    train_loader = DataLoader(
        train_ds,
        batch_size=cfg.batch_size,
        shuffle=True,
        num_workers=cfg.workers,
        pin_memory=pin,
        drop_last=len(train_ds) > cfg.batch_size,
        generator=g,
        persistent_workers=cfg.workers > 0,
    )
    val_loader = DataLoader(
        val_ds,
        batch_size=cfg.batch_size * 2,
        num_workers=cfg.workers,
        pin_memory=pin,
        persistent_workers=cfg.workers > 0,
    )

    run_dir = _new_run_dir(cfg.out_dir)
    training = {
        "dataset": cfg.dataset,
        "data_dir": str(cfg.data_dir) if cfg.dataset != "shapes" else None,
        "mode": cfg.mode,
        "weights": cfg.weights,
        "epochs": cfg.epochs,
        "batch_size": cfg.batch_size,
        "lr": cfg.lr,
        "image_size": cfg.image_size,
        "train_images": len(train_ds),
        "val_images": len(val_ds),
        "seed": cfg.seed,
        "device": str(device),
        "trainable_parameters": sum(p.numel() for p in params),
    }
    log.info(
        "training %s (%s, weights=%s) on %s: %d train / %d val images, %d classes, device %s; "
        "trainable: %s",
        cfg.arch,
        cfg.mode,
        cfg.weights,
        cfg.dataset,
        training["train_images"],
        training["val_images"],
        len(classes),
        device,
        _summarise(trainable_parameter_names(model)),
    )

    history: list[dict[str, Any]] = []
    best_acc, best_confusion = -1.0, None
    for epoch in range(1, cfg.epochs + 1):
        tr = train_one_epoch(
            model, train_loader, optimizer, scheduler, scaler, device, epoch, cfg.progress
        )
        va, confusion = evaluate(model, val_loader, device, len(classes), cfg.progress)
        history.append({"epoch": epoch, "train": asdict(tr), "val": asdict(va)})
        log.info(
            "epoch %d/%d: train loss %.4f acc %.3f (%.0f img/s) | val loss %.4f acc %.3f",
            epoch,
            cfg.epochs,
            tr.loss,
            tr.accuracy,
            tr.images_per_s,
            va.loss,
            va.accuracy,
        )
        common: dict[str, Any] = {
            "architecture": cfg.arch,
            "class_names": classes,
            "spec": spec,
            "training": training,
            "epoch": epoch,
        }
        metrics = {"accuracy": va.accuracy, "val_loss": va.loss, "epoch": epoch}
        save_checkpoint(
            run_dir / "last.pt",
            model,
            metrics=metrics,
            optimizer=optimizer,
            scheduler=scheduler,
            **common,
        )
        if va.accuracy > best_acc:
            best_acc, best_confusion = va.accuracy, confusion
            save_checkpoint(run_dir / "best.pt", model, metrics=metrics, **common)

    summary = {
        "run_dir": str(run_dir),
        "best_checkpoint": str(run_dir / "best.pt"),
        "best_val_accuracy": best_acc,
        "classes": classes,
        "training": training,
        "history": history,
        "finished_at": datetime.now(UTC).isoformat(),
    }
    (run_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
    from models.report import plot_confusion, plot_curves

    plot_curves(history, run_dir / "curves.png")
    assert best_confusion is not None
    plot_confusion(best_confusion, classes, run_dir / "confusion.png")
    _point_latest(cfg.out_dir, run_dir)
    return summary


def _summarise(names: list[str]) -> str:
    prefixes = sorted({n.split(".")[0] for n in names})
    return f"{len(names)} tensors in {', '.join(prefixes)}"


def _new_run_dir(out_dir: Path) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = out_dir / stamp
    n = 1
    while run_dir.exists():
        n += 1
        run_dir = out_dir / f"{stamp}-{n}"
    run_dir.mkdir(parents=True)
    return run_dir


def _point_latest(out_dir: Path, run_dir: Path) -> None:
    latest = out_dir / "latest"
    if latest.is_symlink() or latest.exists():
        latest.unlink()
    latest.symlink_to(run_dir.name)
