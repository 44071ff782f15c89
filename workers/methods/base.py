"""The one small interface every explanation method implements.

The engine runs one forward and one backward pass for a batch and hands every method the
same `PassOutputs`; a method declares what it needs (a layer's activations, their
gradients, the input's gradient) and turns those tensors into one map per image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch


@dataclass
class PassOutputs:
    """What one forward + backward pass produced for a batch of N images."""

    inputs: torch.Tensor  # (N, C, H, W), the preprocessed batch
    logits: torch.Tensor  # (N, classes)
    targets: torch.Tensor  # (N,) long: the class explained for each image
    activations: dict[str, torch.Tensor]  # layer -> (N, K, h, w) output of that layer
    gradients: dict[str, torch.Tensor]  # layer -> d(target score)/d(activations)
    input_gradient: torch.Tensor | None  # (N, C, H, W) d(target score)/d(inputs)


@dataclass
class MethodResult:
    """Raw (unnormalised) maps, one per image, at the method's native resolution."""

    maps: torch.Tensor  # (N, h, w)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


class ExplanationMethod:
    """Base class: set the class attributes, implement `compute`."""

    name: ClassVar[str]
    needs_layer: ClassVar[bool] = False  # wants `layer`'s activations
    needs_layer_gradient: ClassVar[bool] = False  # and their gradients
    needs_input_gradient: ClassVar[bool] = False
    # Maps are scaled to [0, 1] for display against this quantile of each map, not its
    # maximum: pixel-level maps are dominated by a few extreme values otherwise.
    display_quantile: ClassVar[float] = 1.0
    # False for a method with no one map per image (depth): no heatmap, overlay or
    # faithfulness score; its results are all in MethodResult.extras.
    has_map: ClassVar[bool] = True
    # What the raw map is, exactly, for the job manifest (workers.manifest).
    definition: ClassVar[str] = ""

    def __init__(self, layer: str | None = None):
        if self.needs_layer and not layer:
            raise ValueError(f"{self.name} needs a layer name")
        self.layer = layer if self.needs_layer else None

    @property
    def layers_read(self) -> tuple[str, ...]:
        """The layers whose outputs the engine must capture for this method."""
        return (self.layer,) if self.layer else ()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(layer={self.layer!r})"

    def compute(self, p: PassOutputs) -> MethodResult:
        raise NotImplementedError


class ChannelWeightedCAM(ExplanationMethod):
    """The class-activation-map family: L = ReLU(sum_k w_k A_k) over a layer's channels.

    Subclasses say only how the channel weights w_k come from the activations A and the
    gradients dS/dA (as pytorch-grad-cam's methods override one hook of its base_cam).
    """

    needs_layer = True
    needs_layer_gradient = True

    def channel_weights(self, acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        """(N, K, 1, 1) weights for activations and gradients of shape (N, K, h, w)."""
        raise NotImplementedError

    def compute(self, p: PassOutputs) -> MethodResult:
        assert self.layer is not None
        acts, grads = p.activations[self.layer], p.gradients[self.layer]
        weights = self.channel_weights(acts, grads)
        return MethodResult((weights * acts).sum(dim=1).clamp_min(0))
