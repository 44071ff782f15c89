"""Runs worth keeping and comparing: one-line errors for bad inputs through the real CLI,
the frozen-random-backbone warning, resuming from last.pt, and `lantern train --compare`."""

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

from lantern.cli import build_parser
from lantern.core.errors import UsageError
from models.compare import compare, parse_fractions, parse_modes
from models.network import build_model
from models.train import TrainConfig, main

LANTERN = Path(sys.executable).parent / "lantern"
TINY = [
    "train",
    "--arch",
    "resnet18",
    "--image-size",
    "32",
    "--epochs",
    "1",
    "--train-size",
    "32",
    "--val-size",
    "16",
    "--workers",
    "0",
    "--no-progress",
]


def _lantern(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    command = [str(LANTERN)] if LANTERN.exists() else [sys.executable, "-m", "lantern.cli"]
    return subprocess.run(
        [*command, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "BENTOML_DO_NOT_TRACK": "true"},
    )


def _one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("lantern train: error:"), result.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def test_a_corrupt_weights_file_is_a_one_line_error_from_the_cli(tmp_path: Path) -> None:
    torch.save({"model": build_model("resnet18", 4, weights="none").state_dict()}, tmp_path / "w")
    (tmp_path / "truncated.pt").write_bytes((tmp_path / "w").read_bytes()[:100_000])
    result = _lantern(*TINY, "--weights", str(tmp_path / "truncated.pt"), cwd=tmp_path)
    _one_line_error(result, "truncated.pt", "not a PyTorch weights file")
    assert not (tmp_path / "runs").exists()
    # (garbage bytes and other shapes of bad file: tests/test_network.py, in process)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--image-size", "8"], "--image-size 8"),
        (["--image-size", "100000"], "--image-size 100000"),
        (["--train-size", "0"], "--train-size"),
        (["--resize-size", "16"], "--resize-size 16"),
    ],
)
def test_absurd_sizes_are_usage_errors(args: list[str], needle: str) -> None:
    from models.train import check_config

    cfg = TrainConfig(arch="resnet18", image_size=32, weights="none")
    for flag, value in zip(args[::2], args[1::2], strict=True):
        setattr(cfg, flag[2:].replace("-", "_"), int(value))
    with pytest.raises(UsageError, match=re.escape(needle)):
        check_config(cfg)


def test_head_mode_on_random_weights_warns_and_names_the_run(tmp_path: Path) -> None:
    result = _lantern(*TINY, "--weights", "none", "--mode", "head", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "frozen RANDOM backbone" in result.stderr
    (run,) = [p for p in (tmp_path / "runs").iterdir() if p.name.startswith("resnet18")]
    assert re.fullmatch(r"resnet18-head-shapes-\d{8}-\d{6}", run.name)
    metrics = json.loads((run / "metrics.json").read_text())
    assert any("frozen RANDOM backbone" in w for w in metrics["warnings"])
    assert metrics["reproduce"]["command"][:1] == ["train"]
    assert metrics["feature_cache"]["hit"] is False
    assert not (run / "last.pt").exists()


def _tiny(out: Path, **kw: object) -> TrainConfig:
    base: dict[str, object] = {
        "dataset": "shapes",
        "arch": "resnet18",
        "weights": "none",
        "mode": "layer4",
        "epochs": 2,
        "batch_size": 16,
        "lr": 0.002,
        "optimizer": "adamw",
        "image_size": 32,
        "train_size": 32,
        "val_size": 16,
        "workers": 0,
        "out_dir": out,
        "progress": False,
    }
    return TrainConfig(**{**base, **kw})  # type: ignore[arg-type]


def test_an_interrupted_run_resumes_from_last_pt_and_ends_as_an_uninterrupted_one(
    tmp_path: Path,
) -> None:
    whole = main(_tiny(tmp_path / "whole", keep_last=True))

    def stop_after_first(entry: dict) -> None:  # type: ignore[type-arg]
        if entry["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        main(_tiny(tmp_path / "cut", keep_last=True), on_epoch=stop_after_first)
    (cut_dir,) = [p for p in (tmp_path / "cut").iterdir() if p.name.startswith("resnet18")]
    last = torch.load(cut_dir / "last.pt", weights_only=True)
    assert {"optimizer", "scheduler", "resume"} <= set(last) and last["epoch"] == 1
    best = torch.load(cut_dir / "best.pt", weights_only=True)
    assert "optimizer" not in best
    assert (cut_dir / "best.pt").stat().st_size < (cut_dir / "last.pt").stat().st_size

    resumed = main(TrainConfig(resume=cut_dir, progress=False))
    assert resumed["run_dir"] == str(cut_dir)
    assert [h["epoch"] for h in resumed["history"]] == [1, 2]
    a, b = whole["history"][-1], resumed["history"][-1]
    assert a["val"]["accuracy"] == b["val"]["accuracy"]
    assert a["train"]["loss"] == pytest.approx(b["train"]["loss"], rel=1e-3)
    with pytest.raises(UsageError, match="already finished"):
        main(TrainConfig(resume=cut_dir, progress=False))
    with pytest.raises(UsageError, match="--keep-last"):
        main(TrainConfig(resume=Path(whole["run_dir"]).parent / "nowhere", progress=False))


def test_compare_trains_every_mode_and_fraction_and_reports_them_all(tmp_path: Path) -> None:
    cfg = _tiny(tmp_path, epochs=1, train_size=32)
    result = compare(cfg, ["scratch", "head", "layer4", "all"], [0.5, 1.0])
    out = Path(result["compare_dir"])
    rows = result["rows"]
    assert [(r["mode"], r["fraction"]) for r in rows] == [
        (m, f) for f in (0.5, 1.0) for m in ("scratch", "head", "layer4", "all")
    ]
    assert {r["train_images"] for r in rows if r["fraction"] == 0.5} == {16}
    assert {r["train_images"] for r in rows if r["fraction"] == 1.0} == {32}
    assert {r["val_images"] for r in rows} == {16}  # one validation set for all
    by_mode = {r["mode"]: r for r in rows if r["fraction"] == 1.0}
    assert by_mode["head"]["trainable_parameters"] == 512 * 4 + 4
    assert by_mode["scratch"]["trainable_parameters"] == by_mode["all"]["trainable_parameters"]
    assert by_mode["head"]["trainable_parameters"] < by_mode["layer4"]["trainable_parameters"]
    assert by_mode["scratch"]["weights"] == "none" and by_mode["scratch"]["train_mode"] == "all"

    report = (out / "report.md").read_text()
    table = [line for line in report.splitlines() if line.startswith("| ")]
    header = table[0]
    for column in (
        "val accuracy",
        "best epoch",
        "trainable parameters",
        "s/epoch",
        "train images/s",
        "peak memory",
    ):
        assert column in header
    for mode in ("scratch", "head", "layer4", "all"):
        main_row = [line for line in table if line.startswith(f"| {mode} | none |")]
        assert len(main_row) == 1, report
        sweep_row = [
            line for line in table if line.startswith(f"| {mode} | ") and "none" not in line
        ]
        assert len(sweep_row) == 1 and sweep_row[0].count("%") == 2, report
    assert "50 % (16 images)" in report and "100 % (32 images)" in report
    for png in ("accuracy_vs_epoch.png", "accuracy_vs_time.png", "accuracy_vs_train_size.png"):
        assert f"({png})" in report
        with Image.open(out / png) as im:
            im.verify()
    saved = json.loads((out / "compare.json").read_text())
    assert len(saved["rows"]) == 8
    assert all(r["history"] and r["peak_memory_mib"] > 0 for r in saved["rows"])


def test_compare_options_parse_and_refuse_nonsense() -> None:
    args = build_parser().parse_args(["train", "--compare"])
    assert parse_modes(args.compare) == ["scratch", "head", "layer4", "all"]
    args = build_parser().parse_args(["train", "--compare", "head,all", "--fractions", "1,0.1"])
    assert parse_modes(args.compare) == ["head", "all"]
    assert parse_fractions(args.fractions) == [0.1, 1.0]
    with pytest.raises(UsageError, match="unknown comparison mode"):
        parse_modes("head,everything")
    with pytest.raises(UsageError, match="fractions"):
        parse_fractions("0,1.5")


def test_runs_lists_compares_and_cleans_real_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lantern.cli import main as cli

    first = main(_tiny(tmp_path, mode="head", epochs=1, keep_last=True))
    second = main(_tiny(tmp_path, mode="head", epochs=1, lr=0.01))
    names = [Path(first["run_dir"]).name, Path(second["run_dir"]).name]
    capsys.readouterr()

    assert cli(["runs", "--out-dir", str(tmp_path), "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["run"] for r in rows] == names[::-1]  # newest first
    assert [r["resumable"] for r in rows] == [False, True]
    assert rows[0]["best_val_accuracy"] == second["best_val_accuracy"]

    assert cli(["runs", "--out-dir", str(tmp_path), "compare", *names]) == 0
    table = capsys.readouterr().out
    assert "≠ optimizer.lr" in table and "≠ schedule.max_lr" in table
    assert "≠ arch" not in table

    assert cli(["runs", "--out-dir", str(tmp_path), "clean", "--keep", "1"]) == 0
    assert "would delete" in capsys.readouterr().out
    assert (Path(first["run_dir"]) / "last.pt").exists()  # a dry run by default
    assert cli(["runs", "--out-dir", str(tmp_path), "clean", "--keep", "1", "--yes"]) == 0
    assert not Path(first["run_dir"]).exists() and Path(second["run_dir"]).exists()
    assert cli(["runs", "--out-dir", str(tmp_path), "compare", "nowhere"]) == 2
    assert "no finished run" in capsys.readouterr().err
