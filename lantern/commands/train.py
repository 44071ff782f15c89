"""lantern train: fine-tune a ResNet on CIFAR-10, an ImageFolder, or generated shapes;
with --compare, train several transfer modes on the same data and compare them."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from models.train import TrainConfig

HELP = "Fine-tune a ResNet (transfer learning) and write checkpoints and a report."

_DATASETS = ("shapes", "glyphs", "cifar10", "folder")
_ARCHS = ("resnet18", "resnet34", "resnet50")
_MODES = ("head", "layer4", "all")


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = p.add_argument_group("data")
    d.add_argument(
        "--dataset",
        choices=_DATASETS,
        default="shapes",
        help="shapes: generated offline data (circle, square, triangle, cross); glyphs: a "
        "second generated task (star, ring, diamond, arrow); cifar10: torchvision's CIFAR-10; "
        "folder: an ImageFolder tree (one sub-folder per class, or train/ and val/)",
    )
    d.add_argument(
        "--data-dir",
        type=Path,
        default=Path("data"),
        help="where CIFAR-10 lives (or is downloaded to), or the ImageFolder root",
    )
    d.add_argument("--download", action="store_true", help="download CIFAR-10 if missing")
    d.add_argument(
        "--train-size",
        type=int,
        default=None,
        help="shapes: images to generate (default 2000); others: random subset",
    )
    d.add_argument("--val-size", type=int, default=None, help="validation images (subset)")
    d.add_argument(
        "--val-fraction",
        type=float,
        default=0.2,
        help="folder datasets without train/ and val/: share held out",
    )

    m = p.add_argument_group("model")
    m.add_argument("--arch", choices=_ARCHS, default="resnet50")
    m.add_argument(
        "--weights",
        default="imagenet",
        help="imagenet (torchvision IMAGENET1K weights), none, or a Lantern checkpoint "
        "(best.pt), bundle directory or state_dict; trained on another class count, its "
        "backbone transfers and the head starts afresh",
    )
    m.add_argument(
        "--mode",
        choices=_MODES,
        default="layer4",
        help="what learns: head = feature extractor (trains on cached backbone features, "
        "no augmentation), layer4 = last stage + head, all = full fine-tune",
    )
    m.add_argument(
        "--image-size",
        type=int,
        default=224,
        help="model input size; CIFAR's 32 px images are upsampled to it",
    )
    m.add_argument(
        "--resize-size",
        type=int,
        default=None,
        help="shorter side before the centre crop (default: --image-size)",
    )

    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=int, default=3)
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--lr", type=float, default=0.01, help="peak learning rate (one-cycle SGD)")
    t.add_argument(
        "--optimizer",
        choices=("sgd", "adamw"),
        default="sgd",
        help="sgd (momentum 0.9) for fine-tuning; adamw is steadier from scratch",
    )
    t.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--workers", type=int, default=2, help="data-loading processes")
    t.add_argument("--out-dir", type=Path, default=Path("runs"), help="where runs are written")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.add_argument(
        "--keep-last",
        action="store_true",
        help="also write last.pt (optimizer and schedule state) every epoch, for --resume",
    )
    t.add_argument(
        "--resume",
        type=Path,
        default=None,
        metavar="RUN",
        help="continue an interrupted run (its directory or last.pt, written with "
        "--keep-last) with that run's own settings",
    )
    t.add_argument(
        "--no-feature-cache",
        action="store_true",
        help="head mode: run the frozen backbone every epoch instead of training on its "
        "features computed once",
    )
    t.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="where head mode keeps backbone features (default: OUT_DIR/feature-cache)",
    )

    c = p.add_argument_group("comparison")
    c.add_argument(
        "--compare",
        nargs="?",
        const="scratch,head,layer4,all",
        default=None,
        metavar="MODES",
        help="train each of these modes (scratch = --weights none, all layers) on the same "
        "data, split, budget and seed and write one report (default when given alone: "
        "scratch,head,layer4,all); --mode is then ignored",
    )
    c.add_argument(
        "--fractions",
        default="1.0",
        help="with --compare: shares of the training set to sweep, e.g. 0.1,0.25,1.0 "
        "(smaller shares are subsets of larger ones)",
    )
    t.add_argument(
        "--export",
        action="store_true",
        help="export and register the best checkpoint when training ends",
    )


def run(args: argparse.Namespace) -> int:
    from models.train import TrainConfig, main

    cfg = TrainConfig(
        dataset=args.dataset,
        data_dir=args.data_dir,
        download=args.download,
        arch=args.arch,
        weights=args.weights,
        mode=args.mode,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        optimizer=args.optimizer,
        image_size=args.image_size,
        resize_size=args.resize_size,
        device=args.device,
        seed=args.seed,
        workers=args.workers,
        train_size=args.train_size,
        val_size=args.val_size,
        val_fraction=args.val_fraction,
        out_dir=args.out_dir,
        progress=not args.no_progress,
        keep_last=args.keep_last,
        resume=args.resume,
        feature_cache=not args.no_feature_cache,
        cache_dir=args.cache_dir,
    )
    if args.compare is not None:
        return _compare(cfg, args)
    summary = main(cfg)
    print(
        f"best validation accuracy {100 * summary['best_val_accuracy']:.1f}% "
        f"(epoch {summary['best_epoch']}); checkpoint {summary['best_checkpoint']}; "
        f"report in {summary['run_dir']}"
    )
    if args.export:
        from models.export import export_checkpoint

        bundle = export_checkpoint(Path(summary["best_checkpoint"]))
        print(f"registered {bundle.tag}")
    return 0


def _compare(cfg: TrainConfig, args: argparse.Namespace) -> int:
    from lantern.core.errors import UsageError
    from models.compare import compare, parse_fractions, parse_modes
    from models.train import check_config

    if args.resume is not None or args.export:
        raise UsageError("--compare trains several runs: it takes neither --resume nor --export")
    modes, fractions = parse_modes(args.compare), parse_fractions(args.fractions)
    check_config(cfg)
    result = compare(cfg, modes, fractions)
    for row in result["rows"]:
        print(
            f"{row['mode']:>8} @ {100 * row['fraction']:g}% ({row['train_images']} images): "
            f"best {100 * row['best_val_accuracy']:.1f}% at epoch {row['best_epoch']}, "
            f"{row['seconds_per_epoch']:.3g} s/epoch"
        )
    print(f"comparison report: {result['report']}")
    return 0
