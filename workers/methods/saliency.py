"""Saliency (Simonyan et al. 2013): |dS/dx|, the maximum over colour channels."""

from __future__ import annotations

from workers.methods.base import ExplanationMethod, MethodResult, PassOutputs


class Saliency(ExplanationMethod):
    name = "saliency"
    needs_input_gradient = True
    display_quantile = 0.99
    definition = (
        "max over the colour channels of |dy_c/dx|, x the preprocessed (normalised) input, "
        "y_c the target class's logit; at the model's input resolution, unnormalised"
    )

    def compute(self, p: PassOutputs) -> MethodResult:
        assert p.input_gradient is not None
        return MethodResult(p.input_gradient.abs().amax(dim=1))
