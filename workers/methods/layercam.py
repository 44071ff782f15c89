"""LayerCAM (Jiang et al. 2021): every position of every channel weighted by its own
positive gradient, instead of one weight per channel.

    L(i, j) = ReLU(sum_k ReLU(g_k(i, j)) A_k(i, j))        g = dS/dA

Grad-CAM averages the gradient over the map, which is only meaningful for the coarse last
stage; LayerCAM's element-wise weights keep the location of what raised the score, so
the maps of earlier, finer layers stay class-discriminative (the paper's point).
"""

from __future__ import annotations

from workers.methods.base import ExplanationMethod, MethodResult, PassOutputs


class LayerCAM(ExplanationMethod):
    name = "layercam"
    needs_layer = True
    needs_layer_gradient = True
    definition = (
        "ReLU(sum_k ReLU(g^k_ij) A^k_ij), A the layer's output (channels k), g = dy_c/dA^k "
        "at each position ij, y_c the target class's logit (before softmax); LayerCAM "
        "(Jiang et al. 2021): element-wise positive-gradient weights, no spatial average; "
        "after the ReLU, before any normalisation, at the layer's own resolution"
    )

    def compute(self, p: PassOutputs) -> MethodResult:
        assert self.layer is not None
        acts, grads = p.activations[self.layer], p.gradients[self.layer]
        return MethodResult((grads.clamp_min(0) * acts).sum(dim=1).clamp_min(0))
