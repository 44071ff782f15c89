"""Grad-CAM (Selvaraju et al. 2017): the layer's channels weighted by their mean gradient.

alpha_k = mean_ij dS/dA_k(i, j)        L = ReLU(sum_k alpha_k A_k)
"""

from __future__ import annotations

from workers.methods.base import ExplanationMethod, MethodResult, PassOutputs


class GradCAM(ExplanationMethod):
    name = "gradcam"
    needs_layer = True
    needs_layer_gradient = True

    def compute(self, p: PassOutputs) -> MethodResult:
        assert self.layer is not None
        acts, grads = p.activations[self.layer], p.gradients[self.layer]
        weights = grads.mean(dim=(2, 3), keepdim=True)
        return MethodResult((weights * acts).sum(dim=1).clamp_min(0))
