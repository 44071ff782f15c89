"""Training checkpoints: model, optimizer, scheduler, epoch, arguments, and what export needs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lantern.core.preprocess import PreprocessSpec


def save_checkpoint(
    path: Path,
    model: nn.Module,
    *,
    architecture: str,
    class_names: list[str],
    spec: PreprocessSpec,
    training: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    epoch: int = 0,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Everything needed to resume training or to export: plain types only, so that
    `torch.load(..., weights_only=True)` can read it back. `best.pt` is saved without the
    optimizer and scheduler (a third of the size); `last.pt` has them, and `extra`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ckpt: dict[str, Any] = {
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "architecture": architecture,
        "class_names": list(class_names),
        "preprocessing": spec.to_dict(),
        "training": training or {},
        "metrics": metrics or {},
        "epoch": epoch,
    }
    if optimizer is not None:
        ckpt["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        ckpt["scheduler"] = scheduler.state_dict()
    ckpt.update(extra or {})
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(ckpt, tmp)
    tmp.replace(path)  # an interrupted save never leaves a truncated checkpoint
    return path
