"""A finished job's files: each image's rendered maps, and the manifest that lists them.

For every image and method: a heatmap PNG on the model's input crop, an overlay PNG on the
original picture, the raw map as .npy; for activations also the channel grid and the
channels themselves. The manifest (written last by the job: its presence means
"complete") records the model, the methods, the layers, and per image its prediction,
explained target and file names.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import numpy as np
import torch
from PIL import Image

from lantern.core.jobs import ExplainRequest, Method
from lantern.core.store import ArtifactStore
from workers import render
from workers.engine import Explanation
from workers.model_cache import LoadedModel


def render_image(
    store: ArtifactStore,
    job_id: str,
    request: ExplainRequest,
    loaded: LoadedModel,
    original: Image.Image,
    index: int,
    ex: Explanation,
    row: int,
    maps: dict[str, tuple[torch.Tensor, torch.Tensor]],
) -> dict[str, Any]:
    """Write image `index`'s files (row `row` of the chunk `ex`); its manifest entry."""
    name = request.images[index].name
    probs = ex.probabilities[row]
    top = int(probs.argmax())
    target = int(ex.targets[row])
    labels = loaded.class_names
    files: dict[str, dict[str, Any]] = {}
    for method in request.methods:
        m = method.value
        raw, unit = maps[m][0][row].numpy(), maps[m][1][row].numpy()
        entry: dict[str, Any] = {
            "heatmap": f"{name}.{m}.heatmap.png",
            "overlay": f"{name}.{m}.overlay.png",
            "raw": f"{name}.{m}.npy",
        }
        store.write(job_id, entry["heatmap"], render.heatmap_png(unit))
        store.write(job_id, entry["overlay"], render.overlay_png(original, unit, loaded.spec))
        store.write(job_id, entry["raw"], render.npy_bytes(raw))
        if method == Method.ACTIVATIONS:
            result = ex.results[m]
            channels = result.extras["channels"][row].numpy()
            entry["grid"] = f"{name}.{m}.grid.png"
            entry["channels"] = f"{name}.{m}.channels.npy"
            entry["channel_index"] = [int(c) for c in result.extras["channel_index"][row]]
            store.write(job_id, entry["grid"], render.activation_grid_png(channels))
            store.write(job_id, entry["channels"], render.npy_bytes(np.asarray(channels)))
        files[m] = entry
    w, h = original.size
    return {
        "name": name,
        "original_size": [w, h],
        "crop_box": [round(v, 2) for v in loaded.spec.crop_box(w, h)],
        "prediction": {"label": labels[top], "index": top, "probability": float(probs[top])},
        "target": {
            "label": labels[target],
            "index": target,
            "probability": float(probs[target]),
            "requested": request.targets[index] is not None,
        },
        "files": files,
    }


def build_manifest(
    job_id: str, request: ExplainRequest, loaded: LoadedModel, entries: list[dict[str, Any]]
) -> dict[str, Any]:
    spec = loaded.spec
    return {
        "job_id": job_id,
        "model": loaded.bundle.tag,
        "architecture": loaded.bundle.architecture,
        "class_names": loaded.class_names,
        "methods": [m.value for m in request.methods],
        "layer": request.layer,
        "activation_layer": request.effective_activation_layer,
        "input_size": [spec.crop_size, spec.crop_size],
        "created_at": datetime.now(UTC).isoformat(),
        "images": entries,
    }
