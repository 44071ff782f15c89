"""A short fine-tune on generated data learns, reports, exports and registers."""

from __future__ import annotations

import json
import os
import re
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
    assert re.fullmatch(r"resnet18-all-shapes-\d{8}-\d{6}(-\d+)?", run_dir.name), run_dir.name
    best = torch.load(run_dir / "best.pt", weights_only=True)
    assert best["metrics"]["accuracy"] == pytest.approx(short_run["best_val_accuracy"])
    assert best["class_names"] == ["circle", "square", "triangle", "cross"]
    assert "optimizer" not in best and "scheduler" not in best  # weights only: small
    assert not (run_dir / "last.pt").exists()  # only with keep_last (for resuming)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert len(metrics["history"]) == 4 and metrics["training"]["mode"] == "all"
    assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3, 4]
    assert metrics["best_epoch"] == best["epoch"]
    for png in ("curves.png", "confusion.png"):
        with Image.open(run_dir / png) as im:
            im.verify()
    assert "best validation accuracy" in (run_dir / "report.md").read_text()
    assert (run_dir.parent / "latest").resolve() == run_dir.resolve()


def test_metrics_json_holds_what_reproduces_the_run_and_the_confusion_counts(short_run) -> None:  # type: ignore[no-untyped-def]
    metrics = json.loads((Path(short_run["run_dir"]) / "metrics.json").read_text())
    r = metrics["reproduce"]
    assert (r["arch"], r["mode"], r["weights"], r["seed"]) == ("resnet18", "all", "none", 0)
    assert r["optimizer"] == {"name": "adamw", "lr": 0.002, "weight_decay": 1e-4}
    assert r["schedule"]["name"] == "OneCycleLR" and r["schedule"]["total_steps"] == 4 * 16
    assert r["data"]["source"] == "shapes" and r["data"]["augmentation"] is True
    assert (r["data"]["train_size"], r["data"]["val_size"]) == (512, 200)
    assert r["sizes"] == {"image_size": 32, "resize_size": 32, "batch_size": 32, "epochs": 4}
    assert {"torch", "torchvision", "lantern"} <= set(r["versions"])
    assert r["versions"]["torch"] == torch.__version__
    confusion = metrics["confusion"]
    counts = confusion["counts"]
    assert confusion["classes"] == ["circle", "square", "triangle", "cross"]
    assert len(counts) == 4 and all(len(row) == 4 for row in counts)
    assert sum(map(sum, counts)) == 200  # every validation image, once
    correct = sum(counts[i][i] for i in range(4))
    assert correct / 200 == pytest.approx(metrics["best_val_accuracy"])
    assert metrics["timing"]["seconds_per_epoch"] > 0
    assert metrics["transfer"]["kind"] == "none"


def test_the_curves_label_epochs_with_whole_numbers(tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    from models import report

    history = [
        {
            "epoch": e,
            "train": {"loss": 1 / e, "accuracy": 0.5},
            "val": {"loss": 1 / e, "accuracy": 0.5},
        }
        for e in (1, 2, 3)
    ]
    seen: list[list[float]] = []
    real_close = plt.close

    def capture(fig):  # type: ignore[no-untyped-def]
        seen.extend(list(ax.get_xticks()) for ax in fig.axes)
        real_close(fig)

    report.plt.close = capture  # type: ignore[assignment]
    try:
        report.plot_curves(history, tmp_path / "c.png")
    finally:
        report.plt.close = real_close  # type: ignore[assignment]
    assert seen and all(float(t).is_integer() for ticks in seen for t in ticks), seen


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
    # The INT8 graph's fate is printed either way: passed, with its check under OpenVINO
    # (a dev install has openvino); or refused/skipped, with the reason, on stderr.
    int8 = bundle.int8 or {}
    if int8.get("status") == "passed":
        assert f"INT8 under OpenVINO: {int8['openvino']['agreement']:.1f}% agree" in exported.stdout
    else:
        assert f"INT8 graph {str(int8.get('status')).upper()}: " in exported.stderr
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


# --- transfer from a Lantern checkpoint, and head training on cached features -----------


@pytest.fixture(scope="module")
def three_shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another task: three of the four shapes, as an ImageFolder (3 classes, not 4)."""
    from models.data import write_shapes_folder

    root = write_shapes_folder(tmp_path_factory.mktemp("three"), per_class=24, size=32, seed=7)
    import shutil

    shutil.rmtree(root / "cross")
    return root


def _head_run(source: str, data: Path, out: Path, cache: bool) -> dict:  # type: ignore[type-arg]
    return main(
        TrainConfig(
            dataset="folder",
            data_dir=data,
            val_fraction=0.25,
            arch="resnet18",
            weights=source,
            mode="head",
            epochs=2,
            batch_size=16,
            lr=0.01,
            optimizer="adamw",
            image_size=32,
            workers=0,
            out_dir=out,
            progress=False,
            feature_cache=cache,
        )
    )


def _predictions(run: dict, data: Path) -> list[int]:  # type: ignore[type-arg]
    from torch.utils.data import DataLoader

    from lantern.core.preprocess import PreprocessSpec
    from models.network import build_model
    from models.train import evaluate_predictions, load_data

    ckpt = torch.load(Path(run["best_checkpoint"]), weights_only=True)
    model = build_model("resnet18", 3, weights="none")
    model.load_state_dict(ckpt["model"])
    cfg = TrainConfig(dataset="folder", data_dir=data, val_fraction=0.25, image_size=32)
    _, val, _ = load_data(cfg, PreprocessSpec(crop_size=32, resize_size=32), augment=False)
    _, _, predicted = evaluate_predictions(
        model, DataLoader(val, batch_size=64), torch.device("cpu"), 3, progress=False
    )
    return [int(p) for p in predicted]


def test_a_checkpoint_with_another_class_count_transfers_and_cached_features_match(
    short_run,  # type: ignore[no-untyped-def]
    three_shapes: Path,
    tmp_path: Path,
) -> None:
    source = short_run["best_checkpoint"]  # 4 shape classes; the new task has 3
    cached = _head_run(source, three_shapes, tmp_path / "cached", cache=True)
    again = _head_run(source, three_shapes, tmp_path / "cached", cache=True)
    uncached = _head_run(source, three_shapes, tmp_path / "uncached", cache=False)

    # What was transferred: the whole backbone, a new 3-class head; said in the report too.
    t = cached["transfer"]
    assert t["kind"] == "checkpoint" and t["source_classes"] == 4
    assert t["head"] == "re-initialised" and t["layers_loaded"][-1] == "layer4"
    best = torch.load(Path(cached["best_checkpoint"]), weights_only=True)
    src = torch.load(Path(source), weights_only=True)
    assert best["model"]["fc.weight"].shape == (3, 512)
    assert torch.equal(
        best["model"]["layer3.0.conv1.weight"], src["model"]["layer3.0.conv1.weight"]
    )
    metrics = json.loads((Path(cached["run_dir"]) / "metrics.json").read_text())
    assert metrics["transfer"]["head"] == "re-initialised"
    assert "head re-initialised" in (Path(cached["run_dir"]) / "report.md").read_text()

    # The features are computed once, then read from the disk cache.
    assert cached["feature_cache"]["hit"] is False and again["feature_cache"]["hit"] is True
    assert Path(cached["feature_cache"]["path"]).is_file()
    assert uncached["feature_cache"] is None
    assert cached["reproduce"]["data"]["augmentation"] is False

    # Same seed, cached or not: the same accuracy, epoch by epoch, and the same predictions
    # (compared as a user sees them: float rounding may move an image on a class boundary).
    n_val = cached["training"]["val_images"]
    for a, b in zip(cached["history"], uncached["history"], strict=True):
        assert abs(a["val"]["accuracy"] - b["val"]["accuracy"]) <= 1 / n_val + 1e-9
    assert again["best_val_accuracy"] == cached["best_val_accuracy"]
    p_cached = _predictions(cached, three_shapes)
    p_uncached = _predictions(uncached, three_shapes)
    assert sum(a != b for a, b in zip(p_cached, p_uncached, strict=True)) <= 1
