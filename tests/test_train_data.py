"""What `lantern train` promises about its data and sizes (README, "Train, export,
register"), checked on the loaders and the config check themselves:

- `--dataset folder` takes an ImageFolder: one sub-folder per class, split into train and
  validation by `--val-fraction` with the run's seed, or `train/` and `val/` used as given;
- `--image-size` 32 to 1024 is accepted and anything else is a one-line usage error;
- `--mode head|layer4` with `--weights none` warns (a frozen random backbone learns little).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from lantern.core.errors import UsageError
from lantern.core.preprocess import PreprocessSpec
from models.data import write_shapes_folder
from models.train import (
    FROZEN_RANDOM_WARNING,
    MAX_IMAGE_SIZE,
    MIN_IMAGE_SIZE,
    TrainConfig,
    check_config,
    load_data,
    main,
)

SPEC = PreprocessSpec(crop_size=32, resize_size=32)
PER_CLASS = 10  # x 4 shapes


def _files(split: object) -> list[str]:
    """The image paths a split holds, through Subsets down to the ImageFolder."""
    dataset, indices = split, None
    while hasattr(dataset, "indices"):
        picked = list(dataset.indices)  # type: ignore[attr-defined]
        indices = picked if indices is None else [picked[i] for i in indices]
        dataset = dataset.dataset  # type: ignore[attr-defined]
    samples = [path for path, _ in dataset.samples]  # type: ignore[attr-defined]
    return [samples[i] for i in indices] if indices is not None else samples


def _folder_cfg(root: Path, **kw: object) -> TrainConfig:
    return TrainConfig(dataset="folder", data_dir=root, image_size=32, **kw)  # type: ignore[arg-type]


def test_a_flat_image_folder_is_split_by_val_fraction_with_the_seed(tmp_path: Path) -> None:
    root = write_shapes_folder(tmp_path / "flat", per_class=PER_CLASS, size=32)
    every = sorted(str(p) for p in root.rglob("*.png"))
    train, val, classes = load_data(_folder_cfg(root, val_fraction=0.25, seed=3), SPEC)
    assert classes == sorted(p.name for p in root.iterdir())
    train_files, val_files = _files(train), _files(val)
    # Disjoint, covering every image, a quarter of them for validation.
    assert not set(train_files) & set(val_files)
    assert sorted(train_files + val_files) == every
    assert len(val_files) == round(len(every) * 0.25)
    # The same seed gives the same split; another seed another one.
    _, again, _ = load_data(_folder_cfg(root, val_fraction=0.25, seed=3), SPEC)
    _, other, _ = load_data(_folder_cfg(root, val_fraction=0.25, seed=4), SPEC)
    assert _files(again) == val_files and set(_files(other)) != set(val_files)
    with pytest.raises(UsageError, match="--val-fraction"):
        load_data(_folder_cfg(root, val_fraction=1.0), SPEC)


def test_train_and_val_folders_are_used_as_given(tmp_path: Path) -> None:
    root = tmp_path / "split"
    write_shapes_folder(root / "train", per_class=PER_CLASS, size=32, seed=1)
    write_shapes_folder(root / "val", per_class=3, size=32, seed=2)
    train, val, classes = load_data(_folder_cfg(root, val_fraction=0.5), SPEC)
    assert sorted(_files(train)) == sorted(str(p) for p in (root / "train").rglob("*.png"))
    assert sorted(_files(val)) == sorted(str(p) for p in (root / "val").rglob("*.png"))
    assert classes == sorted(p.name for p in (root / "train").iterdir())
    # The two must name the same classes: a class missing from val/ is refused, by name.
    shutil.rmtree(root / "val" / "cross")
    with pytest.raises(UsageError, match="different class folders"):
        load_data(_folder_cfg(root), SPEC)


@pytest.mark.parametrize("size", [MIN_IMAGE_SIZE, 224, MAX_IMAGE_SIZE])
def test_image_sizes_from_32_to_1024_are_accepted(size: int) -> None:
    assert (MIN_IMAGE_SIZE, MAX_IMAGE_SIZE) == (32, 1024)  # the README's range
    check_config(TrainConfig(arch="resnet18", image_size=size, weights="none"))


@pytest.mark.parametrize("size", [MIN_IMAGE_SIZE - 1, MAX_IMAGE_SIZE + 1])
def test_image_sizes_just_outside_the_range_are_a_one_line_usage_error(size: int) -> None:
    cfg = TrainConfig(arch="resnet18", image_size=size, weights="none")
    with pytest.raises(UsageError, match=re.escape(f"--image-size {size}")) as refused:
        check_config(cfg)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize(("mode", "warns"), [("layer4", True), ("all", False)])
def test_a_frozen_random_backbone_warns_in_the_log_and_in_metrics(
    mode: str, warns: bool, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # head mode's warning is checked from the CLI (tests/test_train_runs.py); layer4 also
    # freezes the random stem and first three stages; all trains every layer: no warning.
    cfg = TrainConfig(
        dataset="shapes", arch="resnet18", weights="none", mode=mode, epochs=1,
        batch_size=16, image_size=32, train_size=16, val_size=8, workers=0,
        out_dir=tmp_path, progress=False,
    )  # fmt: skip
    with caplog.at_level("WARNING"):
        run = main(cfg)
    expected = FROZEN_RANDOM_WARNING.format(mode=mode)
    assert f"--mode {mode} with --weights none" in expected
    assert (expected in caplog.text) is warns
    assert (expected in run["warnings"]) is warns
