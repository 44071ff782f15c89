"""ResNet with a new classification head, and the transfer-learning freezing strategies.

Training modes, as the transfer-learning literature names them:
    head    feature extraction: only the new fully-connected head learns
    layer4  the last residual stage and the head learn
    all     full fine-tuning
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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
    TORCH_HOME), "none" (random initialisation), or a Lantern checkpoint, bundle or
    state_dict for this architecture (see `load_weights`: another class count transfers
    the backbone and starts a new head).
    """
    model, _ = build_transfer_model(architecture, num_classes, weights, train_mode)
    return model


def build_transfer_model(
    architecture: str = "resnet50",
    num_classes: int = 10,
    weights: str = "imagenet",
    train_mode: str = "all",
    class_names: list[str] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """`build_model`, plus a record of what was transferred from `weights` (for the report)."""
    if architecture not in _BUILDERS:
        raise UsageError(f"unknown architecture {architecture!r}; choose one of {ARCHITECTURES}")
    if num_classes < 2:
        raise UsageError(f"a classifier needs at least 2 classes, got {num_classes}")
    builder, imagenet = _BUILDERS[architecture]

    transfer: dict[str, Any]
    if weights == "imagenet":
        model = _with_imagenet_weights(builder, imagenet)
        old_head = model.fc
        assert isinstance(old_head, nn.Linear)
        model.fc = nn.Linear(old_head.in_features, num_classes)
        backbone = [k for k in model.state_dict() if not k.startswith("fc.")]
        transfer = {
            "source": f"torchvision {imagenet}",
            "kind": "imagenet",
            "source_classes": 1000,
            "tensors_loaded": len(backbone),
            "layers_loaded": _stages(backbone),
            "head": "re-initialised",
        }
    elif weights == "none":
        model = builder(weights=None, num_classes=num_classes)
        transfer = {
            "source": None,
            "kind": "none",
            "tensors_loaded": 0,
            "layers_loaded": [],
            "head": "random",
        }
    else:
        model = builder(weights=None, num_classes=num_classes)
        transfer = load_weights(model, Path(weights), architecture, class_names)
    set_train_mode(model, train_mode)
    return model, transfer


def _stages(names: list[str]) -> list[str]:
    """The top-level modules that `names` (state_dict keys) belong to, in network order."""
    seen: dict[str, None] = {}
    for n in names:
        seen.setdefault(n.split(".")[0], None)
    return list(seen)


def _with_imagenet_weights(builder, imagenet) -> nn.Module:
    try:
        return builder(weights=imagenet)
    except (OSError, RuntimeError) as e:
        # urllib's URLError is an OSError; a truncated download surfaces as RuntimeError.
        raise ModelError(
            f"could not download the ImageNet weights ({imagenet.url}): {e}. "
            "Use --weights none, or put the file in $TORCH_HOME/hub/checkpoints/ by hand."
        ) from None


def read_weights(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state_dict, what it came from) for a training checkpoint (`best.pt`), a model bundle
    directory (holding `weights.pt` and `meta.json`), a bundle's `weights.pt`, or a plain
    state_dict file. Every failure is one ModelError line."""
    if not path.exists():
        raise ModelError(f"weights file {path} does not exist")
    info: dict[str, Any] = {"source": str(path), "kind": "state_dict"}
    meta_file = None
    if path.is_dir():
        meta_file, path = path / "meta.json", path / "weights.pt"
        if not path.is_file():
            raise ModelError(f"{path.parent} is neither a weights file nor a Lantern bundle")
    elif path.name == "weights.pt":
        meta_file = path.parent / "meta.json"
    if meta_file is not None and meta_file.is_file():
        try:
            meta = json.loads(meta_file.read_text())
        except (OSError, ValueError) as e:
            raise ModelError(f"{meta_file} is not readable JSON: {e}") from None
        info.update(
            kind="bundle",
            source_architecture=meta.get("architecture"),
            source_class_names=meta.get("class_names"),
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelError(
            f"{path} is not a PyTorch weights file ({type(e).__name__}: {first[:200]}); "
            "pass a best.pt from `lantern train`, a bundle directory, or --weights none"
        ) from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        info.update(
            kind="checkpoint",
            source_architecture=obj.get("architecture"),
            source_class_names=obj.get("class_names"),
        )
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(f"{path} holds no model weights (a state_dict of tensors)")
    return obj, info


def load_weights(
    model: nn.Module, path: Path, architecture: str, class_names: list[str] | None = None
) -> dict[str, Any]:
    """Load a checkpoint, bundle or state_dict into `model`; return what was transferred.

    The backbone (every tensor but `fc.*`) must fit `architecture` exactly. The head is
    loaded too when it has the same shape and, where the source names its classes, the same
    class names; otherwise it keeps its fresh initialisation: transfer from another task.
    """
    state, info = read_weights(path)
    target = model.state_dict()
    n_classes = model.fc.out_features  # type: ignore[union-attr]

    def misfit(detail: str) -> ModelError:
        source = info.get("source_architecture")
        made = f" (made for {source})" if source else ""
        return ModelError(
            f"weights in {path}{made} do not fit {architecture} with {n_classes} classes "
            f"({detail}). Check --arch and the dataset's class count."
        )

    backbone = [k for k in target if not k.startswith("fc.")]
    missing = [k for k in backbone if k not in state]
    unexpected = [k for k in state if k not in target]
    if missing or unexpected:
        names = ", ".join((missing or unexpected)[:3])
        raise misfit(f"{'missing' if missing else 'unexpected'} keys: {names}")
    wrong = [k for k in backbone if tuple(state[k].shape) != tuple(target[k].shape)]
    if wrong:
        k = wrong[0]
        raise misfit(f"{k} is {list(state[k].shape)}, expected {list(target[k].shape)}")
    head_fits = all(
        k in state and tuple(state[k].shape) == tuple(target[k].shape)
        for k in target
        if k.startswith("fc.")
    )
    source_names = info.get("source_class_names")
    same_task = source_names is None or class_names is None or list(source_names) == class_names
    load_head = head_fits and same_task
    keep = {k: v for k, v in state.items() if load_head or not k.startswith("fc.")}
    model.load_state_dict(keep, strict=load_head)
    fc_weight = state.get("fc.weight")
    info.update(
        source_classes=int(fc_weight.shape[0]) if fc_weight is not None else None,
        tensors_loaded=len(keep),
        layers_loaded=_stages(list(keep)),
        head="loaded" if load_head else "re-initialised",
    )
    return info


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
