"""bench/torchserve.py serves the prediction benchmark's own weights: the model class its
archive carries takes the Lantern model's state_dict unchanged and computes the same logits.

(The benchmark itself checks, against the running TorchServe, that every answer's top-1
class equals Lantern's fp32 graph's; TorchServe is only installed with the bench extra.)
"""

from __future__ import annotations

import torch

from bench.torchserve_model import NUM_CLASSES, ResNet50
from models.network import build_model


def test_the_archived_model_class_loads_the_benchmark_weights_and_gives_the_same_logits() -> None:
    torch.manual_seed(0)
    lantern = build_model("resnet50", NUM_CLASSES, weights="none").eval()
    served = ResNet50().eval()
    served.load_state_dict(lantern.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(served(x), lantern(x))
