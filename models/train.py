"""Fine-tuning, in the shape of torchvision's classification reference:
`load_data`, `train_one_epoch`, `evaluate`, `main(config)`.

A run directory, `runs/<arch>-<mode>-<data>-<time>/`, holds `best.pt` (highest validation
accuracy; model weights and what export needs, no optimizer state), `metrics.json`
(everything needed to reproduce the run, what was transferred, the per-epoch history,
timings and the validation confusion counts), `report.md`, `curves.png` and
`confusion.png`; `runs/latest` points at the newest run. With `keep_last`, `last.pt` also
holds the optimizer, the schedule and the random state after every epoch, so that
`resume` continues an interrupted run where it stopped.

In `head` mode the backbone is frozen, so its features never change: they are computed
once (without augmentation), cached on disk under a key of architecture, weights, data and
preprocessing, and the head trains on them (see `features.py`).
"""

from __future__ import annotations

import json
import logging
import platform
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset
from tqdm import tqdm

from lantern.core.errors import ModelError, UsageError
from lantern.core.preprocess import PreprocessSpec
from models import data as datasets
from models.checkpoint import save_checkpoint
from models.network import (
    build_transfer_model,
    freeze_batchnorm_statistics,
    resolve_device,
    trainable_parameter_names,
)
from models.transforms import eval_transform, train_transform

log = logging.getLogger(__name__)

# called with ("train" or "eval", images in the batch): fine-grained progress (models/demo.py)
BatchCallback = Callable[[str, int], None]

DATASETS = ("shapes", "glyphs", "cifar10", "folder")
MIN_IMAGE_SIZE = 32  # ResNet downsamples 32x: below this layer4 has no spatial map at all
MAX_IMAGE_SIZE = 1024
FROZEN_RANDOM_WARNING = (
    "--mode {mode} with --weights none trains on a frozen RANDOM backbone: its features "
    "carry no knowledge, so expect little better than chance. Use --weights imagenet or a "
    "checkpoint, or --mode all to train from scratch."
)


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
    train_fraction: float = 1.0  # then keep this share of the training images (nested)
    out_dir: Path = Path("runs")
    progress: bool = True
    keep_last: bool = False  # write last.pt (optimizer + schedule state) for `resume`
    resume: Path | None = None  # a run directory or its last.pt: continue that run
    feature_cache: bool = True  # head mode: train the head on cached backbone features
    cache_dir: Path | None = None  # default: <out_dir>/feature-cache
    run_name: str | None = None  # default: <arch>-<mode>-<data>-<time>
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class EpochStats:
    loss: float
    accuracy: float
    images_per_s: float


# --- data -------------------------------------------------------------------------------


def load_data(
    cfg: TrainConfig, spec: PreprocessSpec, augment: bool = True
) -> tuple[Any, Any, list[str]]:
    """(train, val, class names) with the training and evaluation transforms applied;
    `augment=False` gives the training split the evaluation transform too."""
    train, val, classes = _load_splits(cfg, spec, augment)
    return _fraction(train, cfg.train_fraction, cfg.seed), val, classes


def _load_splits(
    cfg: TrainConfig, spec: PreprocessSpec, augment: bool
) -> tuple[Any, Any, list[str]]:
    eval_tf = eval_transform(spec)
    train_tf = train_transform(spec) if augment else eval_tf
    train: Any
    val: Any
    if cfg.dataset in datasets.GENERATED:
        n_train = cfg.train_size or 2000
        n_val = cfg.val_size or max(200, n_train // 5)
        size, task = cfg.image_size, cfg.dataset
        train = datasets.generated_dataset(task, n_train, size, cfg.seed, train_tf)
        val = datasets.generated_dataset(task, n_val, size, cfg.seed + 10_000, eval_tf)
        return train, val, list(datasets.GENERATED[task])
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


def _fraction(ds: Any, fraction: float, seed: int) -> Any:
    """The first `fraction` of one seeded shuffle: 10 % is part of 25 %, which is part of 100 %."""
    if fraction >= 1.0:
        return ds
    idx = list(range(len(ds)))
    random.Random(f"fraction:{seed}").shuffle(idx)
    keep = max(1, round(len(ds) * fraction))
    return Subset(ds, sorted(idx[:keep]))


def check_config(cfg: TrainConfig) -> None:
    """Refuse settings that cannot make a sensible run, in one line each."""
    if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.lr <= 0:
        raise UsageError("--epochs, --batch-size and --lr must be positive")
    if not MIN_IMAGE_SIZE <= cfg.image_size <= MAX_IMAGE_SIZE:
        raise UsageError(
            f"--image-size {cfg.image_size} is outside {MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE}: "
            f"a ResNet shrinks its input 32x, so below {MIN_IMAGE_SIZE} px its last stage "
            "has no map left (use at least 64 for useful Grad-CAM)"
        )
    if cfg.resize_size is not None and not cfg.image_size <= cfg.resize_size <= 2 * MAX_IMAGE_SIZE:
        raise UsageError(
            f"--resize-size {cfg.resize_size} must be at least --image-size ({cfg.image_size}) "
            f"and at most {2 * MAX_IMAGE_SIZE}"
        )
    for name, value in (("--train-size", cfg.train_size), ("--val-size", cfg.val_size)):
        if value is not None and value < 1:
            raise UsageError(f"{name} must be a positive number of images, got {value}")
    if not 0 < cfg.train_fraction <= 1:
        raise UsageError(f"a training fraction must be in (0, 1], got {cfg.train_fraction}")
    if cfg.workers < 0:
        raise UsageError("--workers must be 0 or more")


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
    on_batch: BatchCallback | None = None,
) -> EpochStats:
    """One pass over `loader`; the learning-rate schedule steps once per batch. `model`
    may be a whole network on images or only its head on cached features. `on_batch` is
    called with ("train", images in the batch) after each step."""
    model.train()
    freeze_batchnorm_statistics(model)
    criterion = nn.CrossEntropyLoss()
    total_loss, correct, seen, start = 0.0, 0, 0, time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch} train", disable=not progress, **_tqdm_opts())
    for images, labels in bar:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        if device.type == "cuda" and images.dim() == 4:
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
        if on_batch is not None:
            on_batch("train", n)
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
    on_batch: BatchCallback | None = None,
) -> tuple[EpochStats, np.ndarray]:
    """Validation loss, accuracy, throughput and the confusion matrix (rows: true class)."""
    stats, confusion, _ = evaluate_predictions(
        model, loader, device, num_classes, progress, on_batch
    )
    return stats, confusion


@torch.inference_mode()
def evaluate_predictions(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    num_classes: int,
    progress: bool = True,
    on_batch: BatchCallback | None = None,
) -> tuple[EpochStats, np.ndarray, np.ndarray]:
    """`evaluate`, plus the predicted class of every validation image, in order
    (`on_batch` is called with ("eval", images in the batch))."""
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    predictions: list[np.ndarray] = []
    total_loss, seen, start = 0.0, 0, time.perf_counter()
    for images, labels in tqdm(loader, desc="          eval", disable=not progress, **_tqdm_opts()):
        images, labels = images.to(device), labels.to(device)
        if device.type == "cuda" and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
            logits = model(images)
        total_loss += float(criterion(logits.float(), labels))
        predicted = logits.argmax(1).cpu().numpy()
        predictions.append(predicted)
        np.add.at(confusion, (labels.cpu().numpy(), predicted), 1)
        seen += labels.size(0)
        if on_batch is not None:
            on_batch("eval", labels.size(0))
    accuracy = float(np.trace(confusion) / max(seen, 1))
    stats = EpochStats(total_loss / max(seen, 1), accuracy, seen / (time.perf_counter() - start))
    return stats, confusion, np.concatenate(predictions) if predictions else np.zeros(0, int)


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


EpochCallback = Callable[[dict[str, Any]], None]


def main(
    cfg: TrainConfig,
    on_epoch: EpochCallback | None = None,
    on_batch: BatchCallback | None = None,
) -> dict[str, Any]:
    """Train, keep the best checkpoint, write the report. Returns the metrics summary.

    `on_epoch` is called with each epoch's history entry (progress bars, comparisons),
    `on_batch` after every training and evaluation batch."""
    from models.features import PeakMemory, cached_features

    resumed: dict[str, Any] | None = None
    if cfg.resume is not None:
        cfg, resumed = _load_resume(cfg)
    check_config(cfg)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    spec = PreprocessSpec(crop_size=cfg.image_size, resize_size=cfg.resize_size or cfg.image_size)
    # Head mode: a frozen backbone sees each image as it is, so features can be cached.
    augment = cfg.mode != "head"
    train_ds, val_ds, classes = load_data(cfg, spec, augment=augment)
    train_ds, val_ds = cast(Any, train_ds), cast(Any, val_ds)
    warnings: list[str] = []
    if cfg.mode in ("head", "layer4") and cfg.weights == "none":
        warnings.append(FROZEN_RANDOM_WARNING.format(mode=cfg.mode))
        log.warning(warnings[-1])

    started = time.perf_counter()
    memory = PeakMemory(device)
    memory.start()
    try:
        model, transfer = build_transfer_model(
            cfg.arch,
            len(classes),
            weights="none" if resumed else cfg.weights,
            train_mode=cfg.mode,
            class_names=classes,
        )
        if resumed:
            model.load_state_dict(resumed["model"])
            transfer = resumed["resume"]["transfer"]
        _log_transfer(transfer)
        model = model.to(device)
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = make_optimizer(cfg, params)

        g = torch.Generator().manual_seed(cfg.seed)
        pin = device.type == "cuda"
        cache_info: dict[str, Any] | None = None
        step_model: nn.Module = model
        extraction_s = 0.0
        if cfg.mode == "head" and cfg.feature_cache:
            t0 = time.perf_counter()
            feats, cache_info = cached_features(cfg, spec, model, train_ds, val_ds, device)
            extraction_s = time.perf_counter() - t0
            cache_info["seconds"] = round(extraction_s, 3)
            train_set: Any = TensorDataset(feats["train"], feats["train_labels"])
            val_set: Any = TensorDataset(feats["val"], feats["val_labels"])
            step_model = cast(nn.Module, model.fc)
            workers = 0  # tensors already in memory
        else:
            train_set, val_set, workers = train_ds, val_ds, cfg.workers
        train_loader = DataLoader(
            train_set,
            batch_size=cfg.batch_size,
            shuffle=True,
            num_workers=workers,
            pin_memory=pin,
            drop_last=len(train_set) > cfg.batch_size,
            generator=g,
            persistent_workers=workers > 0,
        )
        val_loader = DataLoader(
            val_set,
            batch_size=cfg.batch_size * 2,
            num_workers=workers,
            pin_memory=pin,
            persistent_workers=workers > 0,
        )
        steps_per_epoch = len(train_loader)
        steps = cfg.epochs * steps_per_epoch
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=cfg.lr, total_steps=steps, pct_start=0.15
        )
        scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" else None

        history: list[dict[str, Any]] = []
        best_acc, best_epoch, best_confusion = -1.0, 0, None
        first_epoch, elapsed_before = 1, 0.0
        if resumed:
            state = resumed["resume"]
            optimizer.load_state_dict(resumed["optimizer"])
            scheduler.load_state_dict(resumed["scheduler"])
            torch.set_rng_state(state["torch_rng"])
            g.set_state(state["generator"])
            history = list(state["history"])
            best_acc, best_epoch = float(state["best_acc"]), int(state["best_epoch"])
            best_confusion = np.array(state["best_confusion"], dtype=np.int64)
            first_epoch, elapsed_before = int(resumed["epoch"]) + 1, float(state["elapsed"])
            run_dir = Path(state["run_dir"])
            log.info("resuming %s at epoch %d/%d", run_dir, first_epoch, cfg.epochs)
        else:
            run_dir = _new_run_dir(cfg.out_dir, cfg.run_name or run_name(cfg))

        training = {
            "dataset": cfg.dataset,
            "data_dir": str(cfg.data_dir) if cfg.dataset not in datasets.GENERATED else None,
            "arch": cfg.arch,
            "mode": cfg.mode,
            "weights": cfg.weights,
            "epochs": cfg.epochs,
            "batch_size": cfg.batch_size,
            "lr": cfg.lr,
            "optimizer": cfg.optimizer,
            "image_size": cfg.image_size,
            "train_images": len(train_ds),
            "val_images": len(val_ds),
            "train_fraction": cfg.train_fraction,
            "seed": cfg.seed,
            "device": str(device),
            "augmentation": augment,
            "trainable_parameters": sum(p.numel() for p in params),
            "transfer": {k: transfer.get(k) for k in ("source", "kind", "head")},
        }
        log.info(
            "training %s (%s, weights=%s) on %s: %d train / %d val images, %d classes, "
            "device %s; trainable: %s%s",
            cfg.arch,
            cfg.mode,
            cfg.weights,
            cfg.dataset,
            training["train_images"],
            training["val_images"],
            len(classes),
            device,
            _summarise(trainable_parameter_names(model)),
            "; head trains on cached backbone features" if step_model is not model else "",
        )

        setup_s = time.perf_counter() - started
        for epoch in range(first_epoch, cfg.epochs + 1):
            t0 = time.perf_counter()
            tr = train_one_epoch(
                step_model,
                train_loader,
                optimizer,
                scheduler,
                scaler,
                device,
                epoch,
                cfg.progress,
                on_batch,
            )
            train_s = time.perf_counter() - t0
            va, confusion = evaluate(
                step_model, val_loader, device, len(classes), cfg.progress, on_batch
            )
            seconds = time.perf_counter() - t0
            entry = {
                "epoch": epoch,
                "train": asdict(tr),
                "val": asdict(va),
                "seconds": round(seconds, 4),
                "train_seconds": round(train_s, 4),
                # wall time since the model was built: includes feature extraction
                "elapsed_seconds": round(elapsed_before + time.perf_counter() - started, 4),
            }
            history.append(entry)
            log.info(
                "epoch %d/%d: train loss %.4f acc %.3f (%.0f img/s) | val loss %.4f acc %.3f "
                "| %.1f s",
                epoch,
                cfg.epochs,
                tr.loss,
                tr.accuracy,
                tr.images_per_s,
                va.loss,
                va.accuracy,
                seconds,
            )
            common: dict[str, Any] = {
                "architecture": cfg.arch,
                "class_names": classes,
                "spec": spec,
                "training": training,
                "epoch": epoch,
            }
            metrics = {"accuracy": va.accuracy, "val_loss": va.loss, "epoch": epoch}
            if va.accuracy > best_acc:
                best_acc, best_epoch, best_confusion = va.accuracy, epoch, confusion
                save_checkpoint(run_dir / "best.pt", model, metrics=metrics, **common)
            if cfg.keep_last:
                resume_state = {
                    "config": _plain_config(cfg),
                    "transfer": transfer,
                    "history": history,
                    "best_acc": best_acc,
                    "best_epoch": best_epoch,
                    "best_confusion": np.asarray(best_confusion).tolist(),
                    "torch_rng": torch.get_rng_state(),
                    "generator": g.get_state(),
                    "elapsed": elapsed_before + time.perf_counter() - started,
                    "run_dir": str(run_dir),
                }
                save_checkpoint(
                    run_dir / "last.pt",
                    model,
                    metrics=metrics,
                    optimizer=optimizer,
                    scheduler=scheduler,
                    extra={"resume": resume_state},
                    **common,
                )
            if on_epoch is not None:
                on_epoch(entry)
        peak = memory.stop()
    finally:
        memory.stop()

    assert best_confusion is not None
    epoch_seconds = [h["seconds"] for h in history]
    summary = {
        "run_dir": str(run_dir),
        "best_checkpoint": str(run_dir / "best.pt"),
        "last_checkpoint": str(run_dir / "last.pt") if cfg.keep_last else None,
        "best_val_accuracy": best_acc,
        "best_epoch": best_epoch,
        "final_val_accuracy": history[-1]["val"]["accuracy"],
        "classes": classes,
        "training": training,
        "reproduce": _reproduce(cfg, spec, device, steps_per_epoch),
        "transfer": transfer,
        "timing": {
            "seconds_per_epoch": float(np.mean(epoch_seconds)),
            "train_seconds_per_epoch": float(np.mean([h["train_seconds"] for h in history])),
            "train_images_per_s": float(np.mean([h["train"]["images_per_s"] for h in history])),
            "setup_seconds": round(setup_s, 3),
            "feature_extraction_seconds": round(extraction_s, 3),
            "wall_seconds": round(elapsed_before + time.perf_counter() - started, 3),
        },
        "feature_cache": cache_info,
        "memory": peak,
        "confusion": {
            "epoch": best_epoch,
            "classes": classes,
            "rows": "true class",
            "columns": "predicted class",
            "counts": best_confusion.tolist(),
        },
        "warnings": warnings,
        "history": history,
        "finished_at": datetime.now(UTC).isoformat(),
    }
    (run_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
    from models.report import plot_confusion, plot_curves, write_run_report

    plot_curves(history, run_dir / "curves.png")
    plot_confusion(best_confusion, classes, run_dir / "confusion.png")
    write_run_report(summary, run_dir / "report.md")
    _point_latest(run_dir.parent, run_dir)
    return summary


def run_name(cfg: TrainConfig) -> str:
    """<arch>-<mode>-<data>-<time>, e.g. resnet18-head-shapes-20250101-120000."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{cfg.arch}-{cfg.mode}-{data_label(cfg)}-{stamp}"


def data_label(cfg: TrainConfig) -> str:
    """shapes, cifar10, or folder-<directory name>: safe in a file name."""
    data = cfg.dataset if cfg.dataset != "folder" else f"folder-{Path(cfg.data_dir).name}"
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in data)[:40]


def versions() -> dict[str, str]:
    import torchvision

    try:
        lantern = metadata.version("lantern")
    except metadata.PackageNotFoundError:  # pragma: no cover - a source checkout
        lantern = "unknown"
    return {
        "lantern": lantern,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def _reproduce(
    cfg: TrainConfig, spec: PreprocessSpec, device: torch.device, steps_per_epoch: int
) -> dict[str, Any]:
    optimizer: dict[str, Any] = {"name": cfg.optimizer, "lr": cfg.lr}
    optimizer["weight_decay"] = cfg.weight_decay
    if cfg.optimizer == "sgd":
        optimizer["momentum"] = cfg.momentum
    return {
        "arch": cfg.arch,
        "mode": cfg.mode,
        "weights": cfg.weights,
        "optimizer": optimizer,
        "schedule": {
            "name": "OneCycleLR",
            "max_lr": cfg.lr,
            "pct_start": 0.15,
            "steps_per_epoch": steps_per_epoch,
            "total_steps": steps_per_epoch * cfg.epochs,
            "steps": "per batch",
        },
        "data": {
            "source": cfg.dataset,
            "data_dir": str(cfg.data_dir) if cfg.dataset not in datasets.GENERATED else None,
            "train_size": cfg.train_size,
            "val_size": cfg.val_size,
            "val_fraction": cfg.val_fraction,
            "train_fraction": cfg.train_fraction,
            "augmentation": cfg.mode != "head",
            "preprocessing": spec.to_dict(),
        },
        "sizes": {
            "image_size": cfg.image_size,
            "resize_size": cfg.resize_size or cfg.image_size,
            "batch_size": cfg.batch_size,
            "epochs": cfg.epochs,
        },
        "seed": cfg.seed,
        "device": str(device),
        "feature_cache": cfg.mode == "head" and cfg.feature_cache,
        "versions": versions(),
        "command": sys.argv[1:] if Path(sys.argv[0]).name in ("lantern", "cli.py") else None,
    }


def _plain_config(cfg: TrainConfig) -> dict[str, Any]:
    """The config in plain types (for `weights_only` checkpoints)."""
    out: dict[str, Any] = {}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        out[f.name] = str(value) if isinstance(value, Path) else value
    out["resume"] = None
    out["extra"] = {}
    return out


_PATH_FIELDS = ("data_dir", "out_dir", "cache_dir")


def _load_resume(cfg: TrainConfig) -> tuple[TrainConfig, dict[str, Any]]:
    assert cfg.resume is not None
    path = Path(cfg.resume)
    if path.is_dir():
        path = path / "last.pt"
    if not path.is_file():
        raise UsageError(
            f"nothing to resume at {cfg.resume}: a run writes last.pt only when trained "
            "with --keep-last"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelError(f"{path} cannot be read to resume ({first[:200]})") from None
    if not isinstance(ckpt, dict) or "resume" not in ckpt or "optimizer" not in ckpt:
        raise ModelError(f"{path} is not a resumable last.pt (train with --keep-last)")
    saved = dict(ckpt["resume"]["config"])
    for name in _PATH_FIELDS:
        if saved.get(name) is not None:
            saved[name] = Path(saved[name])
    resumed_cfg = TrainConfig(**{**saved, "progress": cfg.progress, "keep_last": True})
    if int(ckpt["epoch"]) >= resumed_cfg.epochs:
        raise UsageError(f"{path}: that run already finished all {resumed_cfg.epochs} epochs")
    return resumed_cfg, ckpt


def _log_transfer(transfer: dict[str, Any]) -> None:
    if transfer.get("kind") in ("checkpoint", "bundle", "state_dict"):
        log.info(
            "transferred %d tensors (%s) from %s (%s classes); head %s",
            transfer["tensors_loaded"],
            ", ".join(transfer["layers_loaded"]),
            transfer["source"],
            transfer.get("source_classes"),
            transfer["head"],
        )


def _summarise(names: list[str]) -> str:
    prefixes = sorted({n.split(".")[0] for n in names})
    return f"{len(names)} tensors in {', '.join(prefixes)}"


def _new_run_dir(out_dir: Path, name: str) -> Path:
    run_dir = out_dir / name
    n = 1
    while run_dir.exists():
        n += 1
        run_dir = out_dir / f"{name}-{n}"
    run_dir.mkdir(parents=True)
    return run_dir


def _point_latest(out_dir: Path, run_dir: Path) -> None:
    latest = out_dir / "latest"
    if latest.is_symlink() or latest.exists():
        latest.unlink()
    latest.symlink_to(run_dir.name)
