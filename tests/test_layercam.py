"""LayerCAM (workers/methods/layercam.py): registered, accepted at the door, the formula,
the worker's files and manifest, and maps that point at the object on a trained model.

The formula is checked three ways: by hand on the tiny CNN of tests/test_methods.py;
against a float64 reimplementation written here (hooks + autograd, no Lantern code) on a
ResNet with random weights, element-wise in float64; and the worker's float32 pass on the
BatchNorm-folded model against that float64 reference by Pearson r (never float32
element-wise: gradient maps differ in the last bits between CPUs and thread counts).
"""

from __future__ import annotations

import base64
import copy
import io
import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from lantern.core.jobs import LAYER_METHODS, Method, layers_needed, parse_methods, parse_request
from workers.engine import explain, fold_batchnorm
from workers.methods import METHODS, GradCAM, LayerCAM, make_method


def test_layercam_is_a_registered_layer_method() -> None:
    assert METHODS[Method.LAYERCAM] is LayerCAM
    assert Method.LAYERCAM in LAYER_METHODS and LayerCAM.needs_layer_gradient
    assert parse_methods("gradcam, LayerCAM") == [Method.GRADCAM, Method.LAYERCAM]
    assert layers_needed(["layercam"], "layer3", None) == ["layer3"]
    assert layers_needed(["layercam", "activations"], "layer3", "layer2") == ["layer3", "layer2"]
    assert make_method("layercam", "layer3").layer == "layer3"
    definition = LayerCAM.definition
    assert "ReLU(g^k_ij)" in definition and "after the ReLU, before any normalisation" in definition


def test_the_door_accepts_layercam_and_checks_its_layer(tiny_bundle: Any) -> None:
    from lantern.core.errors import UnprocessableInput
    from service.explanations import parse_options

    classes = list(tiny_bundle.class_names)
    options = parse_options({"methods": "layercam", "layer": "layer3"}, 1, classes, tiny_bundle)
    assert options.methods == [Method.LAYERCAM] and options.layer == "layer3"
    with pytest.raises(UnprocessableInput, match="layer9"):
        parse_options({"methods": "layercam", "layer": "layer9"}, 1, classes, tiny_bundle)
    with pytest.raises(UnprocessableInput, match="fc"):
        parse_options({"methods": "layercam", "layer": "fc"}, 1, classes, tiny_bundle)


def test_layercam_matches_hand_computed_values() -> None:
    from tests.test_methods import TinyCNN, X

    # The gradient of class c at every position of channel k is W[c, k] / 4.
    # class 0: g = [1/4, 1/8] > 0 -> relu(0.25 A0 + 0.125 A1), as Grad-CAM
    # class 1: g = [-1/4, 1/2] -> relu(0 * A0 + 0.5 A1) = 0.5 A1 (Grad-CAM: relu(-0.25 A0 + 0.5 A1))
    tiny = TinyCNN().eval()
    ex = explain(tiny, torch.stack([X, X]), [LayerCAM("features"), GradCAM("features")], [0, 1])
    expected = torch.tensor([[[0.375, 0.5], [0.75, 0.375]], [[0.5, 0.0], [0.0, 1.5]]])
    torch.testing.assert_close(ex.results["layercam"].maps, expected)
    assert ex.results["gradcam"].maps[1, 0, 0] == 0.25  # the two differ where g < 0


def reference_layercam(model: nn.Module, x: torch.Tensor, layer: str, target: int) -> np.ndarray:
    """LayerCAM written out from the paper, independent of Lantern: (h, w) float64."""
    kept: list[torch.Tensor] = []
    handle = model.get_submodule(layer).register_forward_hook(lambda m, i, o: kept.append(o))
    try:
        score = model(x[None])[0, target]
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(score, kept[0])
    acts = kept[0][0].detach()
    cam = (torch.relu(grad[0]) * acts).sum(dim=0)
    return torch.relu(cam).double().numpy()


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    from bench.localisation import NarrowResNet

    torch.manual_seed(3)
    model = NarrowResNet(width=8).eval()
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                assert m.running_mean is not None and m.running_var is not None
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("layer", ["layer2", "layer3", "layer4"])
def test_layercam_equals_a_float64_reference(resnet: nn.Module, layer: str) -> None:
    torch.manual_seed(4)
    x = torch.randn(3, 3, 64, 64, dtype=torch.float64)
    targets = [0, 2, 3]
    model64 = resnet.double()
    try:
        ours = explain(model64, x, [LayerCAM(layer)], targets).results["layercam"].maps
        for i, t in enumerate(targets):
            ref = reference_layercam(model64, x[i], layer, t)
            assert ref.max() > 0
            np.testing.assert_allclose(ours[i].numpy(), ref, rtol=1e-9, atol=1e-12 * ref.max())
        # what the worker computes: float32 on the BatchNorm-folded model
        refs = [reference_layercam(model64, x[i], layer, t) for i, t in enumerate(targets)]
    finally:
        resnet.float()
    folded = fold_batchnorm(_copy(resnet))
    maps32 = explain(folded, x.float(), [LayerCAM(layer)], targets).results["layercam"].maps
    for m, ref in zip(maps32, refs, strict=True):
        r = np.corrcoef(m.double().numpy().ravel(), ref.ravel())[0, 1]
        assert r > 0.999, r


def _copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).eval()


def test_the_worker_writes_layercam_files_and_manifest(tiny_bundle: Any, tmp_path: Path) -> None:
    """One job run in this process by the job function itself (workers.tasks.explain)."""
    from lantern.core.store import DirectoryStore, read_manifest
    from tests.worker_fixtures import settings_for, shape_png
    from workers import tasks
    from workers.context import WorkerContext, set_context
    from workers.model_cache import ModelCache

    store = DirectoryStore(tmp_path / "artifacts")
    settings = settings_for("redis://127.0.0.1:1/0", tmp_path / "artifacts")
    set_context(WorkerContext(settings, store, ModelCache(torch.device("cpu"))))
    payload = parse_request(
        {
            "model": tiny_bundle.tag,
            "methods": ["layercam", "gradcam"],
            "targets": [None],
            "layer": "layer3",
            "images": [{"name": "shape0", "data_b64": base64.b64encode(shape_png(0)).decode()}],
        }
    ).model_dump(mode="json")
    job_id = "ex-" + "c" * 32
    tasks.explain(payload, job_id=job_id)
    manifest = read_manifest(store, job_id)
    assert manifest is not None and manifest["methods"] == ["layercam", "gradcam"]
    described = manifest["maps"]["layercam"]
    assert described["shape"] == [4, 4] and described["dtype"] == "float32"  # 64 px / 16
    assert described["layer"] == "layer3" and described["definition"] == LayerCAM.definition
    assert described["upsampled"]["shape"] == [64, 64] and described["normalised"] is False
    files = manifest["images"][0]["files"]["layercam"]
    assert files["raw"] == "shape0.layercam.npy"
    assert files["upsampled"] == "shape0.layercam.upsampled.npy"
    listed = set(store.list_files(job_id))
    assert {files["heatmap"], files["overlay"], files["raw"], files["upsampled"]} <= listed
    raw = np.load(io.BytesIO(store.read(job_id, files["raw"])))
    up = np.load(io.BytesIO(store.read(job_id, files["upsampled"])))
    assert raw.dtype == np.float32 and raw.shape == (4, 4) and raw.min() >= 0
    assert up.dtype == np.float32 and up.shape == (64, 64)


class ShapesNet(nn.Module):
    """Three stride-2 convolutions ("features", 8 x 8 at 64 px), global pooling, fc:
    small enough to learn the generated shapes in seconds on two CPU cores."""

    def __init__(self) -> None:
        super().__init__()
        widths = [3, 16, 32, 64]
        self.features = nn.Sequential(
            *(
                nn.Sequential(nn.Conv2d(i, o, 3, stride=2, padding=1), nn.ReLU())
                for i, o in itertools.pairwise(widths)
            )
        )
        self.fc = nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


def test_on_a_model_trained_on_shapes_layercam_points_at_the_object() -> None:
    """A small CNN trained here on generated shapes (models.data.draw_shape, which knows
    each object's box): LayerCAM's peak falls in the object's box far more often than a
    random point would, and than the peak of the inverted map (max - map) does."""
    from bench.localisation import pointing, shapes

    torch.manual_seed(0)
    model = ShapesNet()
    x, y, _ = shapes(800, 64, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(6):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 32):
            idx = perm[i : i + 32]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    x, labels, boxes = shapes(64, 64, seed=1)  # held out: another seed
    with torch.no_grad():
        accuracy = float((model(x).argmax(1) == labels).float().mean())
    assert accuracy > 0.5, accuracy  # it learned the shapes, or the check means nothing
    maps = explain(model, x, [LayerCAM("features")], labels.tolist()).upsampled("layercam")
    inverted = maps.amax(dim=(1, 2), keepdim=True) - maps
    hits = float(pointing(maps, boxes, 0).float().mean())
    misses = float(pointing(inverted, boxes, 0).float().mean())
    chance = float(((boxes[:, 2] - boxes[:, 0] + 1) ** 2).float().mean() / 64**2)
    assert hits > misses + 0.3 and hits > chance + 0.3, (hits, misses, chance)
