"""The `lantern` command line: help for every command, one-line errors for bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lantern.cli import COMMANDS, build_parser
from models.network import build_model


def _lantern(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    return subprocess.run(
        [sys.executable, "-m", "lantern.cli", *args],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=cwd,
        env={**os.environ, **(env or {})},
    )


def _registered_commands() -> list[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return list(sub.choices)  # type: ignore[arg-type]


def test_every_listed_command_is_registered() -> None:
    # Every command module is listed, and the parser registers exactly the list, in order.
    modules = {p.stem for p in (Path(__file__).parent.parent / "lantern" / "commands").glob("*.py")}
    assert set(COMMANDS) == modules - {"__init__"}
    assert _registered_commands() == list(COMMANDS)


def test_top_level_help_lists_the_commands() -> None:
    result = _lantern("--help")
    assert result.returncode == 0
    for name in _registered_commands():
        assert name in result.stdout


@pytest.mark.parametrize("command", _registered_commands())
def test_every_command_has_help(command: str) -> None:
    result = _lantern(command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: lantern {command}")
    assert "--help" in result.stdout


def _assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


_TRAIN = ["train", "--arch", "resnet18", "--image-size", "32", "--epochs", "1", "--workers", "0"]


def test_a_missing_dataset_path_is_a_one_line_error(tmp_path: Path) -> None:
    result = _lantern(
        *_TRAIN, "--weights", "none", "--dataset", "folder", "--data-dir", str(tmp_path / "missing")
    )
    _assert_one_line_error(result, "does not exist")


def test_an_image_folder_with_one_class_is_a_one_line_error(tmp_path: Path) -> None:
    from PIL import Image

    (tmp_path / "cats").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "cats" / "a.png")
    result = _lantern(
        *_TRAIN, "--weights", "none", "--dataset", "folder", "--data-dir", str(tmp_path)
    )
    _assert_one_line_error(result, "at least two classes")


def test_weights_that_do_not_match_are_a_one_line_error(tmp_path: Path) -> None:
    torch.save(build_model("resnet34", 4, weights="none").state_dict(), tmp_path / "w.pt")
    result = _lantern(
        *_TRAIN, "--weights", str(tmp_path / "w.pt"), "--train-size", "8", "--val-size", "8"
    )
    _assert_one_line_error(result, "do not fit resnet18", "--arch")


def test_imagenet_weights_without_network_access_is_a_one_line_error(tmp_path: Path) -> None:
    # Every download goes through a proxy that refuses connections: no network, for sure.
    offline = {
        "https_proxy": "http://127.0.0.1:9",
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "http_proxy": "http://127.0.0.1:9",
        "HTTP_PROXY": "http://127.0.0.1:9",
        "TORCH_HOME": str(tmp_path / "torch-home"),
    }
    result = _lantern(
        *_TRAIN, "--weights", "imagenet", "--train-size", "8", "--val-size", "8", env=offline
    )
    _assert_one_line_error(result, "could not download the ImageNet weights", "--weights none")


def test_cifar10_that_is_not_there_says_to_download_it(tmp_path: Path) -> None:
    result = _lantern(
        *_TRAIN, "--weights", "none", "--dataset", "cifar10", "--data-dir", str(tmp_path)
    )
    _assert_one_line_error(result, "--download")


def test_export_of_a_missing_checkpoint_is_a_one_line_error(tmp_path: Path) -> None:
    result = _lantern("export", str(tmp_path / "none.pt"))
    _assert_one_line_error(result, "does not exist", "lantern train")


def test_a_bad_setting_is_a_one_line_error_naming_the_variable() -> None:
    result = _lantern("settings", env={"LANTERN_MAX_BATCH_SIZE": "abc"})
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "LANTERN_MAX_BATCH_SIZE='abc'" in lines[0], result.stderr


def test_a_reader_that_stops_early_is_not_an_error() -> None:
    """`lantern settings | head -0`: the reader is gone before the first line is written."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "lantern.cli", "settings"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader goes away while the command is still starting
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0, stderr
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr
