"""ResNet with a new classification head, and the transfer-learning freezing strategies.

Training modes, as the transfer-learning literature names them:
    head    feature extraction: only the new fully-connected head learns
    layer4  the last residual stage and the head learn
    all     full fine-tuning
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision import models as tvm

from lantern.core.errors import ModelError, UsageError

ARCHITECTURES: tuple[str, ...] = ("resnet18", "resnet34", "resnet50")
TRAIN_MODES: tuple[str, ...] = ("head", "layer4", "all")

_BUILDERS = {
    "resnet18": (tvm.resnet18, tvm.ResNet18_Weights.IMAGENET1K_V1),
    "resnet34": (tvm.resnet34, tvm.ResNet34_Weights.IMAGENET1K_V1),
    "resnet50": (tvm.resnet50, tvm.ResNet50_Weights.IMAGENET1K_V2),
}


def build_model(
    architecture: str = "resnet50",
    num_classes: int = 10,
    weights: str = "imagenet",
    train_mode: str = "all",
) -> nn.Module:
    """A torchvision ResNet with a fresh `fc` head for `num_classes`.

    `weights` is "imagenet" (torchvision's IMAGENET1K weights, downloaded once into
    TORCH_HOME), "none" (random initialisation), or the path of a checkpoint or state_dict
    for this architecture and class count.
    """
    if architecture not in _BUILDERS:
        raise UsageError(f"unknown architecture {architecture!r}; choose one of {ARCHITECTURES}")
    if num_classes < 2:
        raise UsageError(f"a classifier needs at least 2 classes, got {num_classes}")
    builder, imagenet = _BUILDERS[architecture]

    if weights == "imagenet":
        model = _with_imagenet_weights(builder, imagenet)
        old_head = model.fc
        assert isinstance(old_head, nn.Linear)
        model.fc = nn.Linear(old_head.in_features, num_classes)
    elif weights == "none":
        model = builder(weights=None, num_classes=num_classes)
    else:
        model = builder(weights=None, num_classes=num_classes)
        load_weights(model, Path(weights), architecture)
    set_train_mode(model, train_mode)
    return model


def _with_imagenet_weights(builder, imagenet) -> nn.Module:
    try:
        return builder(weights=imagenet)
    except (OSError, RuntimeError) as e:
        # urllib's URLError is an OSError; a truncated download surfaces as RuntimeError.
        raise ModelError(
            f"could not download the ImageNet weights ({imagenet.url}): {e}. "
            "Use --weights none, or put the file in $TORCH_HOME/hub/checkpoints/ by hand."
        ) from None


def load_weights(model: nn.Module, path: Path, architecture: str) -> None:
    """Load a state_dict (or a training checkpoint holding one) into `model`, strictly."""
    if not path.exists():
        raise ModelError(f"weights file {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelError(f"{path} is not a PyTorch weights file: {e}") from None
    state = obj.get("model", obj) if isinstance(obj, dict) else obj
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:
        first = str(e).strip().splitlines()[0]
        raise ModelError(
            f"weights in {path} do not fit {architecture} with "
            f"{model.fc.out_features} classes ({first}). "  # type: ignore[union-attr]
            "Check --arch and the dataset's class count."
        ) from None


def resolve_device(name: str) -> torch.device:
    """ "auto" -> cuda when PyTorch sees a GPU, else cpu; "cuda" without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise UsageError(f"unknown device {name!r}; choose auto, cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("device cuda was asked for, but PyTorch sees no CUDA GPU; use auto or cpu")
    return torch.device(name)


def set_train_mode(model: nn.Module, mode: str) -> None:
    """Freeze everything that `mode` does not train."""
    if mode not in TRAIN_MODES:
        raise UsageError(f"unknown training mode {mode!r}; choose one of {TRAIN_MODES}")
    trainable_prefixes = {"head": ("fc.",), "layer4": ("layer4.", "fc."), "all": ("",)}[mode]
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith(trainable_prefixes)


def freeze_batchnorm_statistics(model: nn.Module) -> None:
    """Put BatchNorm layers whose parameters are frozen into eval mode.

    Call after `model.train()`: a frozen backbone should keep its ImageNet running
    statistics rather than drift towards the small fine-tuning batches.
    """
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d) and not any(
            p.requires_grad for p in module.parameters()
        ):
            module.eval()


def trainable_parameter_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]
