"""A short fine-tune on generated data learns, reports, exports and registers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from lantern.core.bundle import list_bundles
from lantern.core.errors import ExportParityError
from models.export import export_checkpoint
from models.train import TrainConfig, main

CHANCE = 0.25  # four shape classes


@pytest.fixture(scope="module")
def short_run(tmp_path_factory: pytest.TempPathFactory) -> dict:  # type: ignore[type-arg]
    cfg = TrainConfig(
        dataset="shapes",
        arch="resnet18",
        weights="none",
        mode="all",
        epochs=4,
        batch_size=32,
        lr=0.002,
        optimizer="adamw",
        image_size=32,
        train_size=512,
        val_size=200,
        workers=0,
        out_dir=tmp_path_factory.mktemp("runs"),
        progress=False,
    )
    return main(cfg)


def test_a_short_run_on_generated_data_lowers_the_loss_and_beats_chance(short_run) -> None:  # type: ignore[no-untyped-def]
    history = short_run["history"]
    assert history[-1]["train"]["loss"] < history[0]["train"]["loss"]
    assert history[-1]["val"]["loss"] < history[0]["val"]["loss"]
    assert short_run["best_val_accuracy"] >= CHANCE + 0.15


def test_the_run_keeps_the_best_checkpoint_and_writes_a_report(short_run) -> None:  # type: ignore[no-untyped-def]
    run_dir = Path(short_run["run_dir"])
    best = torch.load(run_dir / "best.pt", weights_only=True)
    assert best["metrics"]["accuracy"] == pytest.approx(short_run["best_val_accuracy"])
    assert best["class_names"] == ["circle", "square", "triangle", "cross"]
    last = torch.load(run_dir / "last.pt", weights_only=True)
    assert {"optimizer", "scheduler", "epoch"} <= set(last) and last["epoch"] == 4
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert len(metrics["history"]) == 4 and metrics["training"]["mode"] == "all"
    for png in ("curves.png", "confusion.png"):
        with Image.open(run_dir / png) as im:
            im.verify()
    assert (run_dir.parent / "latest").resolve() == run_dir.resolve()


def test_export_refuses_to_register_when_parity_fails(short_run) -> None:  # type: ignore[no-untyped-def]
    before = len(list_bundles())
    with pytest.raises(ExportParityError, match="disagree"):
        export_checkpoint(Path(short_run["best_checkpoint"]), tolerance=0.0)
    assert len(list_bundles()) == before


def _lantern(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lantern.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ},
    )


def test_train_then_export_fp16_leaves_a_half_precision_graph_and_models_list_shows_it(
    tmp_path: Path,
) -> None:
    trained = _lantern(
        "train",
        "--dataset",
        "shapes",
        "--arch",
        "resnet18",
        "--weights",
        "none",
        "--mode",
        "all",
        "--image-size",
        "32",
        "--epochs",
        "1",
        "--train-size",
        "64",
        "--val-size",
        "32",
        "--workers",
        "0",
        "--optimizer",
        "adamw",
        "--lr",
        "0.002",
        "--no-progress",
        cwd=tmp_path,
    )
    assert trained.returncode == 0, trained.stderr
    assert (tmp_path / "runs" / "latest" / "best.pt").exists()

    exported = _lantern("export", "--fp16", cwd=tmp_path)  # default: runs/latest/best.pt
    assert exported.returncode == 0, exported.stderr
    tag = exported.stdout.split("registered ", 1)[1].split()[0]

    # --fp16 wrote a half-precision graph beside the float32 one, with float32 inputs and
    # outputs so that callers need not change.
    import onnx

    from lantern.core.bundle import load_bundle

    bundle = load_bundle(tag)
    assert bundle.meta["export"]["fp16"] is True
    assert bundle.onnx_fp16_path is not None and bundle.onnx_fp16_path.is_file()
    half = onnx.load(str(bundle.onnx_fp16_path))
    weights = [t for t in half.graph.initializer if len(t.dims) >= 2]  # conv / linear weights
    assert weights and all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights)
    io_types = {v.type.tensor_type.elem_type for v in [*half.graph.input, *half.graph.output]}
    assert io_types == {onnx.TensorProto.FLOAT}

    listed = _lantern("models", "list", "--json", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    rows = {row["tag"]: row for row in json.loads(listed.stdout)}
    assert tag in rows and rows[tag]["architecture"] == "resnet18"
    assert 0.0 <= rows[tag]["accuracy"] <= 1.0

    table = _lantern("models", cwd=tmp_path)
    assert tag in table.stdout and "ACCURACY" in table.stdout
