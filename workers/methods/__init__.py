"""Explanation methods, one module each, behind `ExplanationMethod` (base.py)."""

from __future__ import annotations

from workers.methods.activations import Activations
from workers.methods.base import ExplanationMethod, MethodResult, PassOutputs
from workers.methods.gradcam import GradCAM
from workers.methods.gradcam_pp import GradCAMPlusPlus
from workers.methods.saliency import Saliency

METHODS: dict[str, type[ExplanationMethod]] = {
    m.name: m for m in (GradCAM, GradCAMPlusPlus, Saliency, Activations)
}


def make_method(name: str, layer: str, activation_layer: str | None = None) -> ExplanationMethod:
    """An instance of the method called `name` (see lantern.jobs.Method)."""
    try:
        cls = METHODS[str(name)]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose from {sorted(METHODS)}") from None
    if cls is Activations:
        return cls(activation_layer or layer)
    return cls(layer if cls.needs_layer else None)


__all__ = [
    "METHODS",
    "Activations",
    "ExplanationMethod",
    "GradCAM",
    "GradCAMPlusPlus",
    "MethodResult",
    "PassOutputs",
    "Saliency",
    "make_method",
]
