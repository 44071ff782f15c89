"""Grad-CAM++ (Chattopadhay et al. 2018): pixel-wise weighted positive gradients.

With the paper's exponential-score closed form, for channel k at position ij:
    a_ij = g^2 / (2 g^2 + sum_ab A_k(a, b) g^3)       (0 where g = 0)
    w_k  = sum_ij a_ij ReLU(g_ij)                     L = ReLU(sum_k w_k A_k)
"""

from __future__ import annotations

import torch

from workers.methods.base import ChannelWeightedCAM

_EPS = 1e-7


class GradCAMPlusPlus(ChannelWeightedCAM):
    name = "gradcam_pp"
    definition = (
        "ReLU(sum_k w_k A^k), A the layer's output (channels k), w_k = sum_ij a_ij "
        "ReLU(g_ij) with g = dy_c/dA^k, a_ij = g^2 / (2 g^2 + sum_ab A^k_ab g^3) (0 where "
        "g = 0), y_c the target class's logit; after the ReLU, before any normalisation, "
        "at the layer's own resolution"
    )

    def channel_weights(self, acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        g2 = grads.pow(2)
        g3 = g2 * grads
        sum_acts = acts.sum(dim=(2, 3), keepdim=True)
        alpha = g2 / (2 * g2 + sum_acts * g3 + _EPS)
        alpha = torch.where(grads != 0, alpha, torch.zeros_like(alpha))
        return (alpha * grads.clamp_min(0)).sum(dim=(2, 3), keepdim=True)
