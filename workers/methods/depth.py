"""Depth: the strongest feature maps of every stage of the network, shallow to deep.

The seed's promise, "initial convolution layers detect edges, deeper layers learn complex
patterns", made visible: for one image, the stem and layer1 ... layer4
(lantern.core.jobs.DEPTH_LAYERS), each stage's `top` channels with the largest spatial
mean, strongest first. All from the one forward pass (forward hooks); no gradient is
needed, so a request for depth alone runs none.

There is no single map to draw a heatmap from: `maps` is empty ((N, 0, 0), `has_map`
False) and the stages are in `extras` ("<layer>.channels" (N, k, h, w) and
"<layer>.channel_index" (N, k)); workers.manifest renders them as one PNG per image.
"""

from __future__ import annotations

import torch

from lantern.core.jobs import DEPTH_LAYERS
from workers.methods.base import ExplanationMethod, MethodResult, PassOutputs

TOP_CHANNELS = 4
LABELS = {"relu": "stem"}  # a row's name on the PNG; the other stages keep their own


def stage_label(layer: str) -> str:
    return LABELS.get(layer, layer)


class Depth(ExplanationMethod):
    name = "depth"
    has_map = False
    definition = (
        "for each stage (the stem: the output of the first convolution after its BatchNorm "
        "and ReLU; then layer1 .. layer4), the channels of its output A (N, K, h, w) with "
        "the largest spatial mean, strongest first, at the stage's own resolution, "
        "unnormalised; their indices in channel_index"
    )

    def __init__(
        self,
        layer: str | None = None,
        stages: tuple[str, ...] = DEPTH_LAYERS,
        top: int = TOP_CHANNELS,
    ):
        super().__init__(layer)
        self.stages = stages
        self.top = top

    @property
    def layers_read(self) -> tuple[str, ...]:
        return self.stages

    def compute(self, p: PassOutputs) -> MethodResult:
        extras: dict[str, torch.Tensor] = {}
        n = int(p.inputs.shape[0])
        for stage in self.stages:
            acts = p.activations[stage]
            k = min(self.top, int(acts.shape[1]))
            index = acts.mean(dim=(2, 3)).topk(k, dim=1).indices  # (N, k)
            extras[f"{stage}.channels"] = acts.gather(
                1, index[:, :, None, None].expand(-1, -1, *acts.shape[2:])
            )
            extras[f"{stage}.channel_index"] = index
        return MethodResult(p.inputs.new_zeros((n, 0, 0)), extras)
