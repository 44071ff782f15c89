"""The model bundle round-trips through the BentoML model store."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest

from lantern.core.bundle import list_bundles, load_bundle
from lantern.core.errors import ModelError
from tests.conftest import TINY_CLASSES, TINY_SIZE


def test_bundle_round_trips_through_the_model_store(tiny_bundle) -> None:  # type: ignore[no-untyped-def]
    loaded = load_bundle(tiny_bundle.tag)
    assert loaded.tag == tiny_bundle.tag and ":" in loaded.tag
    assert loaded.class_names == TINY_CLASSES
    assert loaded.preprocess.crop_size == TINY_SIZE
    assert loaded.weights_path.stat().st_size > 1_000_000
    meta = json.loads((loaded.path / "meta.json").read_text())
    assert meta["export"]["parity_max_abs_diff"] <= 1e-4
    assert meta["training"]["dataset"] == "shapes"
    assert "created_at" in meta
    # latest resolves to a concrete version
    assert load_bundle("lantern-classifier:latest").tag in {b.tag for b in list_bundles()}
    # and the stored ONNX graph runs with a dynamic batch axis
    session = ort.InferenceSession(str(loaded.onnx_path), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        x = np.zeros((batch, 3, TINY_SIZE, TINY_SIZE), np.float32)
        assert session.run(None, {"input": x})[0].shape == (batch, len(TINY_CLASSES))


def test_loading_an_unknown_model_says_how_to_make_one() -> None:
    with pytest.raises(ModelError, match="lantern train"):
        load_bundle("no-such-model:latest")


def test_the_bundle_records_its_explainable_layers(tiny_bundle) -> None:  # type: ignore[no-untyped-def]
    """Every module whose output is an (N, C, H, W) feature map, measured at export with
    forward hooks at the model's input size; the head and the global pooling are not."""
    layers = load_bundle(tiny_bundle.tag).explainable_layers
    assert layers is not None
    assert layers["conv1"] == [64, 32, 32] and layers["maxpool"] == [64, 16, 16]
    assert layers["layer1"] == [64, 16, 16] and layers["layer2"] == [128, 8, 8]
    assert layers["layer3"] == [256, 4, 4] and layers["layer4"] == [512, 2, 2]
    assert layers["layer3.1.conv2"] == [256, 4, 4]
    assert "fc" not in layers and "avgpool" not in layers and "" not in layers
    assert list(layers)[:4] == ["conv1", "bn1", "relu", "maxpool"]  # forward order
    assert tiny_bundle.layer_problem("layer3.1.conv2") is None
    assert "no layer 'layer9'" in (tiny_bundle.layer_problem("layer9") or "")
    for name in ("fc", "avgpool"):
        problem = tiny_bundle.layer_problem(name) or ""
        assert f"layer {name!r} is not a convolutional feature map" in problem
        assert "'layer1', 'layer2', 'layer3', 'layer4'" in problem


def test_a_bundle_without_recorded_layers_accepts_any_layer_name(tiny_bundle) -> None:  # type: ignore[no-untyped-def]
    """Bundles exported before the layers were recorded: nothing is computed in their
    place (the service has no torch); the worker is the one to find out."""
    from dataclasses import replace

    older = replace(
        tiny_bundle,
        meta={
            k: v
            for k, v in tiny_bundle.meta.items()
            if k not in ("explainable_layers", "non_explainable_layers")
        },
    )
    assert older.explainable_layers is None
    assert older.layer_problem("layer9") is None and older.layer_problem("fc") is None
