"""Activations: the feature maps of a named convolutional layer.

The map is the mean over channels; `extras` holds each image's strongest channels (by
mean activation) for the grid, and their indices.
"""

from __future__ import annotations

from workers.methods.base import ExplanationMethod, MethodResult, PassOutputs

TOP_CHANNELS = 16  # a 4 x 4 grid


class Activations(ExplanationMethod):
    name = "activations"
    needs_layer = True
    definition = (
        "mean over channels of the layer's output A (N, K, h, w), at the layer's own "
        "resolution, unnormalised; the channels file holds the channels of A with the "
        "largest spatial mean, strongest first, their indices in channel_index"
    )

    def __init__(self, layer: str | None = None, top: int = TOP_CHANNELS):
        super().__init__(layer)
        self.top = top

    def compute(self, p: PassOutputs) -> MethodResult:
        assert self.layer is not None
        acts = p.activations[self.layer]
        k = min(self.top, acts.shape[1])
        index = acts.mean(dim=(2, 3)).topk(k, dim=1).indices  # (N, k)
        channels = acts.gather(1, index[:, :, None, None].expand(-1, -1, *acts.shape[2:]))
        return MethodResult(acts.mean(dim=1), {"channels": channels, "channel_index": index})
