"""Depth (workers/methods/depth.py): the strongest feature maps of the stem and of layer1
... layer4 side by side, from one forward pass, as a PNG and float32 arrays.

On a hand-made two-stage model the channels chosen are the hand-computed strongest, from
one forward pass without gradients; the PNG has one row per stage at the stated tile
size, each tile the stage's channel enlarged (nearest); the worker writes the files and
the manifest says their shapes; through the real worker and API the PNG downloads.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from lantern.core.jobs import (
    CLASS_METHODS,
    DEPTH_LAYERS,
    LAYER_METHODS,
    Method,
    layers_needed,
    parse_request,
)
from tests.stack_fixtures import Stack, stack  # noqa: F401  (fixture)
from tests.test_explain_api import _wait_finished
from tests.worker_fixtures import shape_png
from workers import render
from workers.engine import explain
from workers.methods import METHODS, Depth, make_method


def test_depth_is_registered_and_reads_the_stem_and_the_four_stages() -> None:
    assert METHODS[Method.DEPTH] is Depth
    assert DEPTH_LAYERS == ("relu", "layer1", "layer2", "layer3", "layer4")
    assert layers_needed(["depth"], "layer4", None) == list(DEPTH_LAYERS)
    # each layer once: layer3 is read by Grad-CAM and by depth
    assert layers_needed(["gradcam", "depth"], "layer3", None) == [
        "layer3",
        "relu",
        "layer1",
        "layer2",
        "layer4",
    ]
    assert make_method("depth", "layer2").layers_read == DEPTH_LAYERS
    # it neither reads the request's layer nor depends on the class explained
    assert Method.DEPTH not in LAYER_METHODS and Method.DEPTH not in CLASS_METHODS
    assert not Depth.needs_layer_gradient and not Depth.needs_input_gradient


class TwoStages(nn.Module):
    """stem: a 1x1 convolution 1 -> 5 channels, weights w = (0.5, 3, -1, 2, 1), so for a
    positive input x the channel means are w * mean(x) and the strongest four are
    1, 3, 4, 0. deep: 2x2 max pooling, then a 1x1 convolution 5 -> 6 whose channel j is
    f_j times stem channel 4, f = (1, -2, 4, 0.5, 3, 2): strongest four 2, 4, 5, 0."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 5, 1, bias=False)
        mix = nn.Conv2d(5, 6, 1, bias=False)
        self.deep = nn.Sequential(nn.MaxPool2d(2), mix)
        self.fc = nn.Linear(6, 2)
        self.forwards: list[bool] = []  # per forward pass: whether autograd was recording
        with torch.no_grad():
            w = torch.tensor([0.5, 3.0, -1.0, 2.0, 1.0])
            self.stem.weight.copy_(w[:, None, None, None])
            f = torch.tensor([1.0, -2.0, 4.0, 0.5, 3.0, 2.0])
            pick = torch.zeros(6, 5)
            pick[:, 4] = f
            mix.weight.copy_(pick[:, :, None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.forwards.append(torch.is_grad_enabled())
        return self.fc(self.deep(self.stem(x)).mean(dim=(2, 3)))


X = torch.arange(1.0, 17.0).reshape(1, 1, 4, 4)  # positive; mean 8.5


def test_the_strongest_channels_of_each_stage_from_one_pass_without_gradients() -> None:
    model = TwoStages().eval()
    ex = explain(model, X, [Depth(stages=("stem", "deep"))])
    extras = ex.results["depth"].extras
    assert extras["stem.channel_index"].tolist() == [[1, 3, 4, 0]]
    assert extras["deep.channel_index"].tolist() == [[2, 4, 5, 0]]
    x = X[0, 0]
    want_stem = torch.stack([3.0 * x, 2.0 * x, 1.0 * x, 0.5 * x])
    torch.testing.assert_close(extras["stem.channels"][0], want_stem)
    pooled = torch.tensor([[6.0, 8.0], [14.0, 16.0]])  # 2x2 max pooling of stem channel 4 = x
    torch.testing.assert_close(
        extras["deep.channels"][0], torch.stack([4.0 * pooled, 3.0 * pooled, 2.0 * pooled, pooled])
    )
    assert model.forwards == [False]  # one forward pass, autograd off: no gradient needed
    assert ex.results["depth"].maps.shape == (1, 0, 0)  # no single map to draw


def test_fewer_channels_than_top_shows_them_all() -> None:
    ex = explain(TwoStages().eval(), X, [Depth(stages=("stem",), top=9)])
    assert ex.results["depth"].extras["stem.channel_index"].tolist() == [[1, 3, 4, 0, 2]]


def test_the_png_has_one_row_per_stage_at_the_stated_tile_size() -> None:
    rng = np.random.default_rng(0)
    stages = [
        ("stem", rng.random((4, 32, 32), dtype=np.float32)),
        ("layer1", rng.random((4, 16, 16), dtype=np.float32)),
        ("layer4", rng.random((4, 2, 2), dtype=np.float32)),
    ]
    tile = render.depth_tile(stages)
    assert tile == render.DEPTH_TILE_MIN == 96
    assert render.depth_tile([("big", np.zeros((4, 112, 112), np.float32))]) == 112
    image = Image.open(io.BytesIO(render.depth_png(stages))).convert("RGB")
    gap, label = render.GRID_GAP, render.DEPTH_LABEL_WIDTH
    assert image.size == (label + 4 * tile + 5 * gap, 3 * tile + 4 * gap)
    pixels = np.asarray(image)
    for r, (_, channels) in enumerate(stages):
        y0 = gap + r * (tile + gap)
        for c, channel in enumerate(channels):
            x0 = label + gap + c * (tile + gap)
            block = pixels[y0 : y0 + tile, x0 : x0 + tile]
            h = channel.shape[0]
            zoom = tile // h  # 3, 6 and 48: whole cells here
            lo, hi = channel.min(), channel.max()
            want = render.colourise((channel - lo) / (hi - lo), render.GRID_COLORMAP)
            np.testing.assert_array_equal(block[::zoom, ::zoom], want)  # one pixel per cell
            np.testing.assert_array_equal(block, np.repeat(np.repeat(want, zoom, 0), zoom, 1))
        # the gap between rows is background
        assert (pixels[y0 + tile : y0 + tile + gap, label:] == 255).all()


def test_the_worker_writes_the_png_and_each_stages_channels(
    tiny_bundle: Any, tmp_path: Path
) -> None:
    """One job run in this process by the job function itself (workers.tasks.explain)."""
    from lantern.core.images import decode_image
    from lantern.core.store import DirectoryStore, read_manifest
    from tests.worker_fixtures import settings_for
    from workers import tasks
    from workers.context import WorkerContext, set_context
    from workers.engine import LayerCapture
    from workers.model_cache import ModelCache

    store = DirectoryStore(tmp_path / "artifacts")
    settings = settings_for("redis://127.0.0.1:1/0", tmp_path / "artifacts")
    cache = ModelCache(torch.device("cpu"))
    set_context(WorkerContext(settings, store, cache))
    data = shape_png(2)
    payload = parse_request(
        {
            "model": tiny_bundle.tag,
            "methods": ["depth", "gradcam"],
            "targets": [None],
            "faithfulness": True,
            "images": [{"name": "shape2", "data_b64": base64.b64encode(data).decode()}],
        }
    ).model_dump(mode="json")
    job_id = "ex-" + "f" * 32
    tasks.explain(payload, job_id=job_id)
    manifest = read_manifest(store, job_id)
    assert manifest is not None and manifest["methods"] == ["depth", "gradcam"]
    assert manifest["maps"]["depth"]["layers"] == list(DEPTH_LAYERS)
    image = manifest["images"][0]
    entry = image["files"]["depth"]
    assert entry["grid"] == "shape2.depth.png" and entry["tile"] == 96
    assert "heatmap" not in entry and "depth" not in image["faithfulness"]
    assert "gradcam" in image["faithfulness"]  # the other maps are still scored
    # 64 px input: the stem at 1/2, layer1 at 1/4 ... layer4 at 1/32
    shapes = {s["layer"]: s["shape"] for s in entry["stages"]}
    assert shapes == {
        "relu": [4, 32, 32],
        "layer1": [4, 16, 16],
        "layer2": [4, 8, 8],
        "layer3": [4, 4, 4],
        "layer4": [4, 2, 2],
    }
    assert [s["label"] for s in entry["stages"]] == ["stem", *DEPTH_LAYERS[1:]]

    loaded = cache.get(tiny_bundle.tag)
    x = torch.from_numpy(loaded.spec.apply_batch([decode_image(data, max_pixels=10**8)]))
    with LayerCapture(loaded.model, DEPTH_LAYERS) as capture, torch.no_grad():
        loaded.model(x)
        outputs = {k: v.clone() for k, v in capture.outputs.items()}
    for stage in entry["stages"]:
        acts = outputs[stage["layer"]][0]
        strongest = acts.mean(dim=(1, 2)).argsort(descending=True)[:4].tolist()
        assert stage["channel_index"] == strongest
        saved = np.load(io.BytesIO(store.read(job_id, stage["file"])))
        assert saved.dtype == np.float32 and list(saved.shape) == stage["shape"]
        np.testing.assert_allclose(saved, acts[strongest].numpy(), rtol=1e-5, atol=1e-6)
    png = Image.open(io.BytesIO(store.read(job_id, entry["grid"])))
    tile, gap = entry["tile"], render.GRID_GAP
    assert png.size == (render.DEPTH_LABEL_WIDTH + 4 * tile + 5 * gap, 5 * tile + 6 * gap)


@pytest.mark.integration
def test_the_depth_png_downloads_through_the_api(stack: Stack) -> None:  # noqa: F811
    files = [("images", ("dog.png", shape_png(1), "image/png"))]
    response = httpx.post(
        f"{stack.url}/explain", data={"methods": "depth"}, files=files, timeout=30
    )
    assert response.status_code == 202, response.text
    status = _wait_finished(stack.url, response.json()["job_id"])
    assert status["status"] == "finished", status
    image = status["manifest"]["images"][0]
    png = httpx.get(stack.url + image["urls"]["depth.grid"], timeout=10)
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(png.content)).size[1] == 5 * 96 + 6 * render.GRID_GAP
    layer4 = httpx.get(stack.url + image["urls"]["depth.channels.layer4"], timeout=10)
    assert layer4.status_code == 200
    assert np.load(io.BytesIO(layer4.content)).shape == (4, 2, 2)
