"""Head mode's cache of frozen-backbone features is keyed by architecture, weights (the
file's SHA-256, or the seed for random weights), data and preprocessing (README, "Head
mode is feature extraction done properly"; models/features.py).

Each test trains the head for one epoch through `models.train.main`, as `lantern train
--mode head` does, on a small generated ImageFolder at 32 px, into a cache directory that
already holds the entry of a baseline run: the identical configuration must hit that
entry; a change of weights, data or preprocessing must miss it and compute (and store)
features of its own, with only that part of the key changed."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from models.data import draw_shape, write_shapes_folder
from models.train import TrainConfig, main

pytestmark = pytest.mark.integration

SIZE = 32
KEY_PARTS = {"format", "arch", "weights", "data", "preprocessing", "augmentation"}


@pytest.fixture(scope="module")
def weights_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two ResNet-18 state_dicts (4 classes), random weights of two different seeds."""
    from models.network import build_model

    root = tmp_path_factory.mktemp("weights")
    paths = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        path = root / f"seed{seed}.pt"
        torch.save(build_model("resnet18", 4, weights="none").state_dict(), path)
        paths.append(path)
    return paths[0], paths[1]


def _folder(root: Path) -> Path:
    return write_shapes_folder(root, per_class=6, size=SIZE, seed=3)  # 24 images, 4 classes


def _config(data: Path, out: Path, **changes: Any) -> TrainConfig:
    cfg = TrainConfig(
        dataset="folder",
        data_dir=data,
        val_fraction=0.25,
        arch="resnet18",
        weights="none",
        mode="head",
        epochs=1,
        batch_size=16,
        lr=0.01,
        optimizer="adamw",
        image_size=SIZE,
        workers=0,
        out_dir=out / "runs",
        cache_dir=out / "feature-cache",
        progress=False,
    )
    return replace(cfg, **changes)


def _run(cfg: TrainConfig) -> dict[str, Any]:
    info: dict[str, Any] = main(cfg)["feature_cache"]
    assert info is not None and set(info["key"]) == KEY_PARTS, info
    return info


def _features(info: dict[str, Any]) -> dict[str, torch.Tensor]:
    stored: dict[str, torch.Tensor] = torch.load(info["path"], weights_only=True)
    return stored


def _changed_parts(a: dict[str, Any], b: dict[str, Any]) -> set[str]:
    return {part for part in KEY_PARTS if a["key"][part] != b["key"][part]}


def _assert_recomputed(new: dict[str, Any], base: dict[str, Any], *, changed: str) -> None:
    """`new` missed `base`'s entry, computed features that differ, stored them under a
    key of its own that differs from base's in `changed` alone, and left base's entry."""
    assert new["hit"] is False, new
    assert new["path"] != base["path"] and Path(new["path"]).is_file()
    assert _changed_parts(new, base) == {changed}, (new["key"], base["key"])
    ours, theirs = _features(new), _features(base)
    assert ours["key"] == new["key"] and theirs["key"] == base["key"]
    differs = any(
        ours[s].shape != theirs[s].shape or not torch.allclose(ours[s], theirs[s])
        for s in ("train", "val")
    )
    assert differs, "the new entry holds the baseline's features"
    cache_dir = Path(base["path"]).parent
    assert sorted(p.name for p in cache_dir.glob("*.pt")) == sorted(
        Path(p).name for p in (new["path"], base["path"])
    )


def test_the_identical_configuration_hits_and_a_copy_of_the_weights_file_too(
    tmp_path: Path, weights_files: tuple[Path, Path]
) -> None:
    data = _folder(tmp_path / "data")
    first, _ = weights_files
    base = _run(_config(data, tmp_path, weights=str(first)))
    assert base["hit"] is False and Path(base["path"]).is_file()
    again = _run(_config(data, tmp_path, weights=str(first)))
    assert again["hit"] is True and again["path"] == base["path"] and again["key"] == base["key"]
    # The weights are known by their content (SHA-256), not their path.
    copy = tmp_path / "elsewhere" / "copy.pt"
    copy.parent.mkdir()
    shutil.copy(first, copy)
    moved = _run(_config(data, tmp_path, weights=str(copy)))
    assert moved["hit"] is True and moved["path"] == base["path"]
    assert len(list(Path(base["path"]).parent.glob("*.pt"))) == 1


def test_other_weights_miss_a_file_of_other_content_or_another_seed_for_random_ones(
    tmp_path: Path, weights_files: tuple[Path, Path]
) -> None:
    data = _folder(tmp_path / "data")
    first, second = weights_files
    base = _run(_config(data, tmp_path, weights=str(first)))
    other = _run(_config(data, tmp_path, weights=str(second)))
    _assert_recomputed(other, base, changed="weights")
    assert set(other["key"]["weights"]) == {"file_sha256"}

    # Random weights: the seed fixes them, so another seed is another entry (the seed
    # also draws the split, so the data part of the key changes with it).
    cache = tmp_path / "random"
    seed0 = _run(_config(data, cache, weights="none", seed=0))
    seed1 = _run(_config(data, cache, weights="none", seed=1))
    assert seed1["hit"] is False and seed1["path"] != seed0["path"]
    assert seed0["key"]["weights"]["random"] == 0 and seed1["key"]["weights"]["random"] == 1
    assert not torch.allclose(_features(seed0)["val"], _features(seed1)["val"])
    assert _run(_config(data, cache, weights="none", seed=0))["hit"] is True


def test_a_changed_image_an_added_image_or_a_relabelled_one_misses(tmp_path: Path) -> None:
    data = _folder(tmp_path / "data")
    base = _run(_config(data, tmp_path))

    # One image replaced by another picture of the same name.
    target = data / "circle" / "00000.png"
    draw_shape(1, SIZE, seed=99).image.save(target)  # a square's picture, same file name
    changed = _run(_config(data, tmp_path))
    _assert_recomputed(changed, base, changed="data")
    assert changed["key"]["data"]["n_train"] == base["key"]["data"]["n_train"]

    # One image added.
    cache = tmp_path / "added"
    before = _run(_config(data, cache))
    with Image.open(data / "square" / "00000.png") as im:
        im.rotate(90).save(data / "square" / "extra.png")
    added = _run(_config(data, cache))
    _assert_recomputed(added, before, changed="data")

    # One image moved to another class: same pixels, another label.
    cache = tmp_path / "moved"
    before = _run(_config(data, cache))
    shutil.move(data / "square" / "extra.png", data / "cross" / "extra.png")
    moved = _run(_config(data, cache))
    assert moved["hit"] is False and moved["path"] != before["path"]
    assert _changed_parts(moved, before) == {"data"}


def test_another_image_size_misses(tmp_path: Path) -> None:
    data = _folder(tmp_path / "data")
    base = _run(_config(data, tmp_path))
    bigger = _run(_config(data, tmp_path, image_size=48))
    _assert_recomputed(bigger, base, changed="preprocessing")
    assert bigger["key"]["preprocessing"]["crop_size"] == 48
    # Only the resize before the crop changed: still another entry.
    resized = _run(_config(data, tmp_path, resize_size=40))
    assert resized["hit"] is False and resized["path"] not in (base["path"], bigger["path"])
    assert _changed_parts(resized, base) == {"preprocessing"}
