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
