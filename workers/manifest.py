"""A finished job's files: each image's rendered maps, and the manifest that lists them.

For every image and method:

    <name>.<method>.npy            the raw map as the method computed it: native resolution
                                   (the layer's h x w; the input's for saliency), float32,
                                   unnormalised
    <name>.<method>.upsampled.npy  that map upsampled to the model's input (bilinear,
                                   align_corners=False), float32: what the PNGs are made from
    <name>.<method>.heatmap.png    the upsampled map scaled to [0, 1], on the input crop
    <name>.<method>.overlay.png    the same, blended over the original picture

and for activations also the channel grid (PNG) and the channels themselves (float32,
(k, h, w), native).

depth has no single map, so none of the four files above; instead

    <name>.depth.png               one row per stage (stem, layer1 .. layer4), its strongest
                                   channels side by side, each tile enlarged (nearest)
    <name>.depth.<layer>.npy       each stage's channels, float32 (k, h, w), native

with `stages` in the entry (layer, label, shape, channel_index, file) and the tile size.

With compare_top=k, each image's entry also has `compare`: one item per rank r = 1..k
(its class label, index and probability, and per class-dependent method its files). Rank
1 is the image's own top class, whose files are the ordinary ones above; ranks 2..k are
written as `<name>.<method>.rank<r>.<kind>` (heatmap.png, overlay.png, npy,
upsampled.npy).

The manifest (written last by the job: its presence means
"complete") records the model, the methods, the layers, per method what its raw map is
(`maps`: shape, dtype, layer, definition, the upsampling and display scaling behind the
PNGs), that BatchNorm is folded (`batchnorm`), and per image its prediction, explained
target and file names.
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
from workers.engine import UPSAMPLING, Explanation
from workers.methods import ExplanationMethod
from workers.methods.depth import Depth, stage_label
from workers.model_cache import LoadedModel

BATCHNORM = (
    "folded: the worker folds every BatchNorm that follows a convolution into that "
    "convolution before explaining (workers.engine.fold_batchnorm); predictions and maps "
    "equal the unfolded model's up to float32 rounding, and the output of a named "
    "convolution includes its BatchNorm"
)

COMPARE = (
    "compare_top=k: per image, `compare` lists its k most probable classes, most probable "
    "first (rank, label, index, probability), each with its own maps for every method that "
    "depends on the class (Grad-CAM, Grad-CAM++, LayerCAM, saliency), from one forward "
    "pass and one gradient per class; rank 1's files are the image's ordinary files, rank "
    "r's are <name>.<method>.rank<r>.<kind>"
)


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
    """Write image `index`'s files (row `row` of the chunk `ex`); its manifest entry.

    `maps[method]` is (the upsampled maps, those maps scaled to [0, 1]) of the chunk; the
    native maps are `ex.results[method].maps`."""
    name = request.images[index].name
    probs = ex.probabilities[row]
    top = int(probs.argmax())
    target = int(ex.targets[row])
    labels = loaded.class_names
    files: dict[str, dict[str, Any]] = {}
    for method in request.methods:
        m = method.value
        if method == Method.DEPTH:
            files[m] = _write_depth_files(store, job_id, name, ex, row)
            continue
        entry = _write_map_files(
            store, job_id, f"{name}.{m}", ex, m, row, maps[m], original, loaded
        )
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


def render_ranks(
    store: ArtifactStore,
    job_id: str,
    request: ExplainRequest,
    loaded: LoadedModel,
    original: Image.Image,
    index: int,
    ranked: list[Explanation],
    row: int,
    rank_maps: list[dict[str, tuple[torch.Tensor, torch.Tensor]]],
    first_files: dict[str, dict[str, Any]],
) -> list[dict[str, Any]]:
    """Image `index`'s `compare` list: per rank (ranked[r], rank_maps[r] as in
    render_image), its class and, per method in rank_maps[r], its files. Rank 1's files
    are `first_files` (render_image's, for the same class); the other ranks' are written
    here."""
    name = request.images[index].name
    labels = loaded.class_names
    compared = []
    for r, (ex, maps) in enumerate(zip(ranked, rank_maps, strict=True), start=1):
        target = int(ex.targets[row])
        if r == 1:
            files = {m: first_files[m] for m in maps}
        else:
            files = {
                m: _write_map_files(
                    store, job_id, f"{name}.{m}.rank{r}", ex, m, row, maps[m], original, loaded
                )
                for m in maps
            }
        compared.append(
            {
                "rank": r,
                "label": labels[target],
                "index": target,
                "probability": float(ex.probabilities[row][target]),
                "files": files,
            }
        )
    return compared


def _write_depth_files(
    store: ArtifactStore, job_id: str, name: str, ex: Explanation, row: int
) -> dict[str, Any]:
    """Write the depth PNG and each stage's channels; the entry that lists them."""
    extras = ex.results[Method.DEPTH.value].extras
    layers = [key.removesuffix(".channels") for key in extras if key.endswith(".channels")]
    rows = [(stage_label(layer), extras[f"{layer}.channels"][row].numpy()) for layer in layers]
    entry: dict[str, Any] = {"grid": f"{name}.depth.png", "tile": render.depth_tile(rows)}
    store.write(job_id, entry["grid"], render.depth_png(rows))
    stages = []
    for layer, (label, channels) in zip(layers, rows, strict=True):
        file = f"{name}.depth.{layer}.npy"
        store.write(job_id, file, render.npy_bytes(channels))
        entry[f"channels.{layer}"] = file
        index = extras[f"{layer}.channel_index"][row]
        stages.append(
            {
                "layer": layer,
                "label": label,
                "shape": [int(d) for d in channels.shape],
                "channel_index": [int(c) for c in index],
                "file": file,
            }
        )
    entry["stages"] = stages
    return entry


def _write_map_files(
    store: ArtifactStore,
    job_id: str,
    stem: str,
    ex: Explanation,
    method: str,
    row: int,
    maps: tuple[torch.Tensor, torch.Tensor],
    original: Image.Image,
    loaded: LoadedModel,
) -> dict[str, Any]:
    """Write `<stem>.heatmap.png`, `.overlay.png`, `.npy` and `.upsampled.npy` of one map."""
    native = ex.results[method].maps[row].numpy()
    upsampled, unit = maps[0][row].numpy(), maps[1][row].numpy()
    entry: dict[str, Any] = {
        "heatmap": f"{stem}.heatmap.png",
        "overlay": f"{stem}.overlay.png",
        "raw": f"{stem}.npy",
        "upsampled": f"{stem}.upsampled.npy",
    }
    store.write(job_id, entry["heatmap"], render.heatmap_png(unit))
    store.write(job_id, entry["overlay"], render.overlay_png(original, unit, loaded.spec))
    store.write(job_id, entry["raw"], render.npy_bytes(native))
    store.write(job_id, entry["upsampled"], render.npy_bytes(upsampled))
    return entry


def describe_maps(
    methods: list[ExplanationMethod], shapes: dict[str, list[int]], input_size: list[int]
) -> dict[str, dict[str, Any]]:
    """Per method: what its raw map is, exactly, and how the PNGs are made from it.

    `shapes[method]` is the native (h, w) of its maps, as computed."""
    described: dict[str, dict[str, Any]] = {}
    for method in methods:
        if isinstance(method, Depth):
            described[method.name] = {
                "layers": list(method.stages),
                "dtype": "float32",
                "definition": method.definition,
                "normalised": False,
                "channels": f"float32 (k, h, w) per stage, k <= {method.top}, native resolution",
                "display": (
                    f"one row per stage, shallow to deep; each channel scaled to [0, 1] on its "
                    f"own, {render.GRID_COLORMAP} colour map, enlarged without smoothing "
                    f"(nearest) to tiles of at least {render.DEPTH_TILE_MIN} px"
                ),
            }
            continue
        quantile = method.display_quantile
        top = "maximum" if quantile >= 1.0 else f"{quantile:g} quantile (values above it are 1)"
        info: dict[str, Any] = {
            "shape": shapes[method.name],
            "dtype": "float32",
            "layer": method.layer,  # None: the input (saliency)
            "definition": method.definition,
            "normalised": False,
            "upsampled": {"shape": input_size, "dtype": "float32", "method": UPSAMPLING},
            "display": (
                f"the upsampled map scaled per image to [0, 1] between its minimum and its "
                f"{top}; {render.HEAT_COLORMAP} colour map; the overlay resizes it "
                "(bilinear) onto the crop box of the original picture"
            ),
        }
        if method.name == Method.ACTIVATIONS.value:
            info["channels"] = "float32 (k, h, w): the k strongest channels, native resolution"
        described[method.name] = info
    return described


def build_manifest(
    job_id: str,
    request: ExplainRequest,
    loaded: LoadedModel,
    entries: list[dict[str, Any]],
    maps: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The job's manifest; `maps` is describe_maps()'s answer."""
    spec = loaded.spec
    manifest: dict[str, Any] = {
        "job_id": job_id,
        "model": loaded.bundle.tag,
        "architecture": loaded.bundle.architecture,
        "class_names": loaded.class_names,
        "methods": [m.value for m in request.methods],
        "layer": request.layer,
        "activation_layer": request.effective_activation_layer,
        "input_size": [spec.crop_size, spec.crop_size],
        "maps": maps or {},
        "batchnorm": BATCHNORM,
        "created_at": datetime.now(UTC).isoformat(),
        "images": entries,
    }
    if request.compare_top is not None:  # absent otherwise: plain manifests stay as they were
        manifest["compare_top"] = request.compare_top
        manifest["compare"] = COMPARE
    return manifest
