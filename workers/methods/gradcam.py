"""Grad-CAM (Selvaraju et al. 2017): the layer's channels weighted by their mean gradient.

alpha_k = mean_ij dS/dA_k(i, j)        L = ReLU(sum_k alpha_k A_k)
"""

from __future__ import annotations

import torch

from workers.methods.base import ChannelWeightedCAM


class GradCAM(ChannelWeightedCAM):
    name = "gradcam"
    definition = (
        "ReLU(sum_k w_k A^k), A the layer's output (channels k), w_k the spatial mean of "
        "dy_c/dA^k, y_c the target class's logit (before softmax); taken after the ReLU, "
        "before any normalisation, at the layer's own resolution"
    )

    def channel_weights(self, acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        return grads.mean(dim=(2, 3), keepdim=True)
