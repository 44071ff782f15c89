"""Building ResNets with a new head, and the transfer-learning freezing strategies."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from lantern.core.errors import ModelError, UsageError
from models.network import (
    build_model,
    build_transfer_model,
    freeze_batchnorm_statistics,
    load_weights,
    trainable_parameter_names,
)


@pytest.mark.parametrize(
    ("mode", "expected_prefixes"),
    [("head", {"fc"}), ("layer4", {"layer4", "fc"}), ("all", None)],
)
def test_freezing_modes_leave_exactly_the_expected_parameters_trainable(
    mode: str, expected_prefixes: set[str] | None
) -> None:
    model = build_model("resnet18", 5, weights="none", train_mode=mode)
    all_names = [n for n, _ in model.named_parameters()]
    trainable = trainable_parameter_names(model)
    if expected_prefixes is None:
        assert trainable == all_names
    else:
        expected = [n for n in all_names if n.split(".")[0] in expected_prefixes]
        assert trainable == expected
        # and nothing outside those stages learns
        frozen = set(all_names) - set(trainable)
        assert frozen and all(n.split(".")[0] not in expected_prefixes for n in frozen)


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50"])
def test_new_head_has_one_output_per_class(arch: str) -> None:
    model = build_model(arch, 7, weights="none", train_mode="head")
    assert isinstance(model.fc, nn.Linear) and model.fc.out_features == 7
    with torch.inference_mode():
        assert model.eval()(torch.zeros(1, 3, 64, 64)).shape == (1, 7)


def test_frozen_batchnorm_keeps_its_running_statistics() -> None:
    model = build_model("resnet18", 3, weights="none", train_mode="layer4")
    model.train()
    freeze_batchnorm_statistics(model)
    assert not model.bn1.training and not model.layer3[0].bn1.training
    assert model.layer4[0].bn1.training
    before = model.bn1.running_mean.clone()
    model(torch.randn(4, 3, 64, 64) * 5 + 3)
    assert torch.equal(model.bn1.running_mean, before)


def test_a_checkpoint_loads_back_into_the_same_architecture(tmp_path: Path) -> None:
    source = build_model("resnet18", 4, weights="none")
    torch.save({"model": source.state_dict()}, tmp_path / "ckpt.pt")
    model = build_model("resnet18", 4, weights=str(tmp_path / "ckpt.pt"))
    assert torch.equal(model.fc.weight, source.fc.weight)


@pytest.mark.parametrize("arch", ["resnet34", "resnet50"])
def test_weights_of_another_architecture_are_refused(tmp_path: Path, arch: str) -> None:
    torch.save(build_model("resnet18", 4, weights="none").state_dict(), tmp_path / "w.pt")
    with pytest.raises(ModelError, match=r"do not fit .*--arch"):
        build_model(arch, 4, weights=str(tmp_path / "w.pt"))


def test_a_checkpoint_with_another_class_count_transfers_its_backbone(tmp_path: Path) -> None:
    source = build_model("resnet18", 4, weights="none")
    torch.save({"model": source.state_dict(), "class_names": list("abcd")}, tmp_path / "c.pt")
    model, transfer = build_transfer_model(
        "resnet18", 10, weights=str(tmp_path / "c.pt"), class_names=list("0123456789")
    )
    assert torch.equal(model.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    assert model.fc.out_features == 10  # a new head for the new task
    assert transfer["kind"] == "checkpoint" and transfer["head"] == "re-initialised"
    assert transfer["source_classes"] == 4
    assert transfer["layers_loaded"] == ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4"]
    backbone = [k for k in model.state_dict() if not k.startswith("fc.")]
    assert transfer["tensors_loaded"] == len(backbone)


def test_a_bundle_directory_transfers_and_the_same_task_keeps_its_head(tmp_path: Path) -> None:
    source = build_model("resnet18", 4, weights="none")
    torch.save(source.state_dict(), tmp_path / "weights.pt")
    (tmp_path / "meta.json").write_text(
        '{"architecture": "resnet18", "class_names": ["a", "b", "c", "d"]}'
    )
    same, t_same = build_transfer_model("resnet18", 4, str(tmp_path), class_names=list("abcd"))
    assert t_same["kind"] == "bundle" and t_same["head"] == "loaded"
    assert torch.equal(same.fc.weight, source.fc.weight)
    # same class count, other classes: another task, so the head starts afresh
    other, t_other = build_transfer_model("resnet18", 4, str(tmp_path), class_names=list("wxyz"))
    assert t_other["head"] == "re-initialised"
    assert not torch.equal(other.fc.weight, source.fc.weight)
    assert torch.equal(other.conv1.weight, source.conv1.weight)


def test_missing_or_garbage_weights_files_are_refused(tmp_path: Path) -> None:
    model = build_model("resnet18", 4, weights="none")
    with pytest.raises(ModelError, match="does not exist"):
        load_weights(model, tmp_path / "nope.pt", "resnet18")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="not a PyTorch weights file"):
        load_weights(model, tmp_path / "junk.pt", "resnet18")
    torch.save(model.state_dict(), tmp_path / "whole.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "whole.pt").read_bytes()[:4096])
    with pytest.raises(ModelError, match="not a PyTorch weights file") as cut:
        load_weights(model, tmp_path / "cut.pt", "resnet18")
    assert "\n" not in str(cut.value)


def test_unknown_architecture_mode_and_class_count_are_usage_errors() -> None:
    with pytest.raises(UsageError, match="architecture"):
        build_model("vgg16", 4, weights="none")
    with pytest.raises(UsageError, match="training mode"):
        build_model("resnet18", 4, weights="none", train_mode="everything")
    with pytest.raises(UsageError, match="at least 2 classes"):
        build_model("resnet18", 1, weights="none")


def test_device_names_resolve_or_say_what_to_use() -> None:
    from models.network import resolve_device

    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(UsageError, match="choose auto, cpu or cuda"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="no CUDA GPU"):
            resolve_device("cuda")
