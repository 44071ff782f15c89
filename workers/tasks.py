"""The RQ job function, `explain(payload)`, and the per-process model cache.

A job: validate the payload (lantern.jobs.ExplainRequest), load the model version it names
(once per process), decode and preprocess the images, run the engine chunk by chunk,
render each image's maps, write them to the artifact store under the job id, report
progress in job.meta, and write manifest.json last.

Errors a person can fix (a bad payload, an unreadable image, an unknown model, layer or
class) fail the job at once with a readable reason and are not retried; anything else
is retried while the job has retries left.
"""

from __future__ import annotations

import io
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import nn

from lantern.errors import JobError, LanternError
from lantern.jobs import META_ERROR, META_PROGRESS, ExplainRequest, Method, parse_request
from lantern.redis_retry import retry_redis
from lantern.settings import Settings, get_settings
from lantern.store import ArtifactStore, open_store, write_manifest
from models.bundle import Bundle, load_bundle
from models.network import build_model, load_weights, resolve_device
from models.preprocess import PreprocessSpec
from workers import render
from workers.engine import Explanation, explain_in_chunks, fold_batchnorm, normalise
from workers.methods import make_method

log = logging.getLogger(__name__)

MODEL_CACHE_SIZE = 2  # model versions kept per process


# --- the model cache -------------------------------------------------------------------


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


_cache: OrderedDict[tuple[str, str], LoadedModel] = OrderedDict()
_cache_lock = threading.Lock()
_configured: dict[str, Any] = {}


def configure(settings: Settings | None = None, device: str | None = None) -> None:
    """Set this process's settings and device (the worker does, once, at start)."""
    if settings is not None:
        _configured["settings"] = settings
    if device is not None:
        _configured["device"] = device


def current_settings() -> Settings:
    settings: Settings = _configured.get("settings") or get_settings()
    return settings


def get_model(tag: str, device: torch.device | None = None) -> LoadedModel:
    """The model version `tag` on `device`, loaded once per process and kept."""
    device = device or resolve_device(_configured.get("device") or current_settings().device)
    bundle = load_bundle(tag)  # resolves ':latest' to the concrete version
    key = (bundle.tag, str(device))
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
        model = build_model(bundle.architecture, len(bundle.class_names), weights="none")
        load_weights(model, bundle.weights_path, bundle.architecture)
        # Gradients flow to the input and to layer outputs only, never to the weights.
        model.requires_grad_(False)
        fold_batchnorm(model.eval()).to(device)
        loaded = LoadedModel(bundle, model, device)
        _cache[key] = loaded
        while len(_cache) > MODEL_CACHE_SIZE:
            _cache.popitem(last=False)
        log.info("loaded %s (%s) on %s", bundle.tag, bundle.architecture, device)
        return loaded


def warm_up(tag: str, device: torch.device | None = None) -> LoadedModel:
    """Load `tag` and run one tiny explanation so the first job does not pay for it."""
    loaded = get_model(tag, device)
    size = loaded.spec.crop_size
    x = torch.zeros(1, 3, size, size, device=loaded.device)
    methods = [make_method(m, "layer4") for m in ("gradcam", "saliency")]
    try:
        list(explain_in_chunks(loaded.model, x, methods, None, 1, loaded.device))
    except LanternError as e:  # a model without 'layer4' still serves other layers
        log.info("warm-up pass skipped: %s", e)
    return loaded


# --- the job ---------------------------------------------------------------------------


def explain(payload: dict[str, Any], job_id: str | None = None) -> dict[str, Any]:
    """RQ entry point ("workers.tasks.explain"): JSON in, a small JSON summary out."""
    from rq import get_current_job

    job = get_current_job()
    if job is not None:
        job_id = job.id
        job.meta.pop(META_ERROR, None)
    if not job_id:
        raise JobError("explain() runs inside an RQ job or needs job_id")
    try:
        request = parse_request(payload)
        return run_job(request, job_id, open_store(current_settings()), job)
    except LanternError as e:
        _record_failure(job, str(e), permanent=True)
        raise
    except torch.OutOfMemoryError as e:
        _record_failure(job, f"out of GPU memory even one image at a time: {e}", permanent=False)
        raise
    except Exception as e:
        _record_failure(job, f"internal error ({type(e).__name__}: {e})", permanent=False)
        raise


def _record_failure(job: Any, message: str, permanent: bool) -> None:
    if job is None:
        return
    job.meta[META_ERROR] = message
    if permanent:
        job.retries_left = 0  # retrying cannot fix it; the worker reads this on failure
    try:
        retry_redis("record a job's error", job.save_meta, current_settings().redis_retry_seconds)
    except Exception:  # Redis gone for good: the traceback still records the failure
        log.exception("could not record the failure of job %s", job.id)


def run_job(
    request: ExplainRequest, job_id: str, store: ArtifactStore, job: Any = None
) -> dict[str, Any]:
    settings = current_settings()
    if len(request.images) > settings.max_images_per_job:
        raise JobError(
            f"{len(request.images)} images in one job; the limit is {settings.max_images_per_job}"
        )
    loaded = get_model(request.model)
    spec = loaded.spec
    originals = [
        _decode(im.name, _image_bytes(im, job_id, store), settings) for im in request.images
    ]
    batch = torch.from_numpy(spec.apply_batch(originals))
    methods = [
        make_method(m, request.layer, request.effective_activation_layer) for m in request.methods
    ]
    n = len(originals)
    _progress(job, 0, n)

    entries: list[dict[str, Any]] = []
    for start, end, ex in explain_in_chunks(
        loaded.model, batch, methods, request.targets, settings.explain_chunk_size, loaded.device
    ):
        maps = {}
        for method in methods:
            raw = ex.upsampled(method.name)
            maps[method.name] = (raw, normalise(raw, method.display_quantile))
        for i in range(start, end):
            entries.append(
                _render_image(store, job_id, request, loaded, originals[i], i, ex, i - start, maps)
            )
        _progress(job, end, n)

    manifest = {
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
    write_manifest(store, job_id, manifest)
    return {"manifest": "manifest.json", "images": n, "model": loaded.bundle.tag}


def _progress(job: Any, done: int, total: int) -> None:
    if job is not None:
        job.meta[META_PROGRESS] = {"done": done, "total": total}
        retry_redis("record job progress", job.save_meta, current_settings().redis_retry_seconds)


def _image_bytes(image: Any, job_id: str, store: ArtifactStore) -> bytes:
    data = image.image_bytes()
    if data is not None:
        return bytes(data)
    try:
        return store.read(job_id, image.ref)
    except JobError:
        raise JobError(
            f"image {image.name!r} was passed by reference ({image.ref}) but is not in the "
            "artifact store; are the API and the workers sharing the same artifact_dir?"
        ) from None


def _decode(name: str, data: bytes, settings: Settings) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > settings.max_pixels:
                raise JobError(
                    f"image {name!r} is {im.width}x{im.height}, over the limit of "
                    f"{settings.max_pixels} pixels"
                )
            return ImageOps.exif_transpose(im).convert("RGB")
    except (OSError, Image.DecompressionBombError, ValueError) as e:
        raise JobError(f"image {name!r} is not an image Lantern can read ({e})") from None


def _render_image(
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
