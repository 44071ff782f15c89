"""The worker's model cache: each model version loaded once per process and kept.

A version is built from its bundle's `weights.pt` (the same version the API serves from
`model.onnx`), frozen (gradients flow to the input and to layer outputs only) and has its
BatchNorm folded into the convolutions, then kept for the next job. The cache holds the
`MODEL_CACHE_SIZE` most recently used versions.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from lantern.core.bundle import Bundle, load_bundle
from lantern.core.errors import LanternError
from lantern.core.preprocess import PreprocessSpec
from models.network import build_model, load_weights
from workers.engine import explain_in_chunks, fold_batchnorm
from workers.methods import make_method

log = logging.getLogger(__name__)

MODEL_CACHE_SIZE = 2  # model versions kept per process


@dataclass(frozen=True)
class LoadedModel:
    bundle: Bundle
    model: nn.Module
    device: torch.device

    @property
    def spec(self) -> PreprocessSpec:
        return self.bundle.preprocess

    @property
    def class_names(self) -> list[str]:
        return self.bundle.class_names


class ModelCache:
    """Model versions on one device, loaded on first use, least recently used evicted."""

    def __init__(self, device: torch.device, size: int = MODEL_CACHE_SIZE):
        self.device = device
        self.size = size
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, tag: str) -> LoadedModel:
        """The model version `tag` (':latest' resolves to a concrete version)."""
        bundle = load_bundle(tag)
        with self._lock:
            if bundle.tag in self._models:
                self._models.move_to_end(bundle.tag)
                return self._models[bundle.tag]
            model = build_model(bundle.architecture, len(bundle.class_names), weights="none")
            load_weights(model, bundle.weights_path, bundle.architecture)
            model.requires_grad_(False)
            fold_batchnorm(model.eval()).to(self.device)
            loaded = LoadedModel(bundle, model, self.device)
            self._models[bundle.tag] = loaded
            while len(self._models) > self.size:
                self._models.popitem(last=False)
            log.info("loaded %s (%s) on %s", bundle.tag, bundle.architecture, self.device)
            return loaded

    def warm_up(self, tag: str) -> LoadedModel:
        """Load `tag` and run one tiny explanation so the first job does not pay for it."""
        loaded = self.get(tag)
        size = loaded.spec.crop_size
        x = torch.zeros(1, 3, size, size, device=loaded.device)
        methods = [make_method(m, "layer4") for m in ("gradcam", "saliency")]
        try:
            list(explain_in_chunks(loaded.model, x, methods, None, 1, loaded.device))
        except LanternError as e:  # a model without 'layer4' still serves other layers
            log.info("warm-up pass skipped: %s", e)
        return loaded
