"""Explanation methods, one module each, behind `ExplanationMethod` (base.py).

The methods a user can ask for are listed once, in `lantern.core.jobs.Method`; this module
maps each of them to its implementation, and `tests/test_methods.py` checks the two agree.
"""

from __future__ import annotations

from lantern.core.jobs import Method
from workers.methods.activations import Activations
from workers.methods.base import ExplanationMethod, MethodResult, PassOutputs
from workers.methods.depth import Depth
from workers.methods.gradcam import GradCAM
from workers.methods.gradcam_pp import GradCAMPlusPlus
from workers.methods.layercam import LayerCAM
from workers.methods.saliency import Saliency

METHODS: dict[Method, type[ExplanationMethod]] = {
    Method(m.name): m for m in (GradCAM, GradCAMPlusPlus, LayerCAM, Saliency, Activations, Depth)
}


def make_method(
    name: Method | str, layer: str, activation_layer: str | None = None
) -> ExplanationMethod:
    """An instance of the method called `name` (one of lantern.core.jobs.Method)."""
    try:
        cls = METHODS[Method(str(name))]
    except ValueError:
        choices = ", ".join(m.value for m in Method)
        raise ValueError(f"unknown method {name!r}; choose from {choices}") from None
    if cls is Activations:
        return cls(activation_layer or layer)
    return cls(layer if cls.needs_layer else None)


__all__ = [
    "METHODS",
    "Activations",
    "Depth",
    "ExplanationMethod",
    "GradCAM",
    "GradCAMPlusPlus",
    "LayerCAM",
    "MethodResult",
    "PassOutputs",
    "Saliency",
    "make_method",
]
