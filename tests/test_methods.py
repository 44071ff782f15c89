"""Each explanation method against values computed by hand on a tiny CNN.

The network: a 1x1 convolution (2 -> 2 channels, weights [[1, 0], [0, -1]]) and a ReLU
form the layer "features"; global average pooling; a linear layer W = [[1, 0.5], [-1, 2]]
without bias. For a 2x2 input the gradient of class c's score with respect to channel k
of "features" is W[c, k] / 4 at every position, which makes every map computable by hand.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from workers.engine import explain
from workers.methods import Activations, GradCAM, GradCAMPlusPlus, Saliency, make_method


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(2, 2, 1, bias=False), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.features[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, -1.0]])[:, :, None, None])
            self.fc.weight.copy_(torch.tensor([[1.0, 0.5], [-1.0, 2.0]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


# channel 0 -> A0 = relu(x0) = [[1, 2], [3, 0]];  channel 1 -> A1 = relu(-x1) = [[1, 0], [0, 3]]
X = torch.tensor([[[1.0, 2.0], [3.0, -4.0]], [[-1.0, 0.5], [2.0, -3.0]]])
# logits: S0 = 1 * mean(A0) + 0.5 * mean(A1) = 1.5 + 0.5 = 2.0;  S1 = -1.5 + 2 * 1 = 0.5


@pytest.fixture
def tiny() -> TinyCNN:
    torch.manual_seed(0)
    return TinyCNN().eval()


def test_logits_are_the_hand_computed_ones(tiny: TinyCNN) -> None:
    ex = explain(tiny, X[None], [Saliency()])
    torch.testing.assert_close(ex.logits, torch.tensor([[2.0, 0.5]]))
    assert ex.targets.tolist() == [0]  # default: the image's own top-1


def test_gradcam_matches_hand_computed_values(tiny: TinyCNN) -> None:
    # class 0: alpha = [1/4, 0.5/4] -> relu(0.25 A0 + 0.125 A1)
    # class 1: alpha = [-1/4, 2/4]  -> relu(-0.25 A0 + 0.5 A1)
    ex = explain(tiny, torch.stack([X, X]), [GradCAM("features")], targets=[None, 1])
    expected = torch.tensor([[[0.375, 0.5], [0.75, 0.375]], [[0.25, 0.0], [0.0, 1.5]]])
    torch.testing.assert_close(ex.results["gradcam"].maps, expected)


def test_saliency_matches_hand_computed_values(tiny: TinyCNN) -> None:
    # dS0/dx0 = 0.25 [x0 > 0], dS0/dx1 = -0.125 [x1 < 0]; |.| then max over channels
    # dS1/dx0 = -0.25 [x0 > 0], dS1/dx1 = -0.5 [x1 < 0]
    ex = explain(tiny, torch.stack([X, X]), [Saliency()], targets=[0, 1])
    expected = torch.tensor([[[0.25, 0.25], [0.25, 0.125]], [[0.5, 0.25], [0.25, 0.5]]])
    torch.testing.assert_close(ex.results["saliency"].maps, expected)


def test_gradcam_pp_matches_hand_computed_values(tiny: TinyCNN) -> None:
    # Constant gradient g per channel: a = g^2 / (2 g^2 + sum(A) g^3) = 1 / (2 + sum(A) g),
    # w = 4 a relu(g).  class 0: g = (1/4, 1/8), sum(A) = (6, 4) -> w = (1/3.5, 0.2)
    # class 1: g = (-1/4, 1/2) -> w = (0, 4 * 0.25 * 0.5 = 0.5)
    ex = explain(tiny, torch.stack([X, X]), [GradCAMPlusPlus("features")], targets=[0, 1])
    a0 = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
    a1 = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    expected = torch.stack([a0 / 3.5 + 0.2 * a1, 0.5 * a1])
    torch.testing.assert_close(ex.results["gradcam_pp"].maps, expected, atol=1e-5, rtol=1e-5)


def test_activations_show_the_strongest_channels_first(tiny: TinyCNN) -> None:
    ex = explain(tiny, X[None], [Activations("features", top=2)])
    result = ex.results["activations"]
    assert result.extras["channel_index"].tolist() == [[0, 1]]  # mean(A0) 1.5 > mean(A1) 1
    torch.testing.assert_close(
        result.extras["channels"][0],
        torch.tensor([[[1.0, 2.0], [3.0, 0.0]], [[1.0, 0.0], [0.0, 3.0]]]),
    )
    torch.testing.assert_close(result.maps[0], torch.tensor([[1.0, 1.0], [1.5, 1.5]]))


def test_make_method_knows_every_contract_method() -> None:
    from lantern.core.jobs import Method
    from workers.methods import METHODS

    assert set(METHODS) == set(Method)  # one registry: every method has one implementation
    for m in Method:
        method = make_method(m.value, "layer4", "layer2")
        assert method.name == m.value
    assert make_method("activations", "layer4", "layer2").layer == "layer2"
    assert make_method("saliency", "layer4").layer is None
    with pytest.raises(ValueError, match="unknown method"):
        make_method("lime", "layer4")


def test_the_contract_knows_which_methods_read_a_layer() -> None:
    """lantern.core.jobs.LAYER_METHODS (what the API checks) agrees with the methods."""
    from lantern.core.jobs import LAYER_METHODS, layers_needed
    from workers.methods import METHODS

    assert {m for m, cls in METHODS.items() if cls.needs_layer} == LAYER_METHODS
    assert layers_needed(["saliency"], "fc", None) == []
    assert layers_needed(["gradcam", "activations"], "layer4", None) == ["layer4"]
    assert layers_needed(["gradcam_pp", "activations"], "layer4", "fc") == ["layer4", "fc"]
    assert layers_needed(["saliency", "activations"], "layer4", "layer2") == ["layer2"]


def test_every_method_states_its_definition_for_the_manifest() -> None:
    from lantern.core.jobs import Method
    from workers.methods import METHODS

    for cls in METHODS.values():
        assert len(cls.definition) > 40, cls
    assert "after the ReLU, before any normalisation" in METHODS[Method.GRADCAM].definition


def test_the_contract_knows_which_maps_depend_on_the_class() -> None:
    """lantern.core.jobs.CLASS_METHODS (what compare_top draws once per class) is exactly
    the methods that read a gradient of the target's score."""
    from lantern.core.jobs import CLASS_METHODS
    from workers.methods import METHODS

    reads_a_gradient = {
        m for m, cls in METHODS.items() if cls.needs_layer_gradient or cls.needs_input_gradient
    }
    assert reads_a_gradient == CLASS_METHODS
