"""The RQ job function, `explain(payload)` (lantern.core.jobs.JOB_FUNCTION).

A job: validate the payload (lantern.core.jobs.ExplainRequest), take the model version it
names from the worker's model cache, decode the images with the one decoder the API uses
too (lantern.core.images), run the engine chunk by chunk, render each image's maps and
write them to the worker's artifact store under the job id (workers.manifest), score each
map with deletion and insertion curves when the request asks for faithfulness
(workers.faithfulness), report progress in job.meta, and write manifest.json last.
Everything it needs comes from the worker's context (workers.context).

Errors a person can fix (a bad payload, an unreadable image, an unknown model, a layer
that does not exist or is no convolutional feature map, an unknown class) fail the job
at once with a readable reason and are not retried; anything else is retried while the
job has retries left.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from PIL import Image

from lantern.core.errors import JobError, LanternError
from lantern.core.images import decode_image
from lantern.core.jobs import (
    META_ERROR,
    META_PROGRESS,
    ExplainRequest,
    check_image_count,
    parse_request,
)
from lantern.core.redis_retry import retry_redis
from lantern.core.store import ArtifactStore, write_manifest
from workers import faithfulness
from workers.context import WorkerContext, current_context
from workers.engine import explain_in_chunks, normalise
from workers.manifest import build_manifest, describe_maps, render_image
from workers.methods import make_method

log = logging.getLogger(__name__)


def explain(payload: dict[str, Any], job_id: str | None = None) -> dict[str, Any]:
    """RQ entry point ("workers.tasks.explain"): JSON in, a small JSON summary out."""
    from rq import get_current_job

    context = current_context()
    job = get_current_job()
    if job is not None:
        job_id = job.id
        job.meta.pop(META_ERROR, None)
    if not job_id:
        raise JobError("explain() runs inside an RQ job or needs job_id")
    try:
        request = parse_request(payload)
        return run_job(request, job_id, context, job)
    except LanternError as e:
        _record_failure(job, context, str(e), permanent=True)
        raise
    except torch.OutOfMemoryError as e:
        message = f"out of GPU memory even one image at a time: {e}"
        _record_failure(job, context, message, permanent=False)
        raise
    except Exception as e:
        message = f"internal error ({type(e).__name__}: {e})"
        _record_failure(job, context, message, permanent=False)
        raise


def _record_failure(job: Any, context: WorkerContext, message: str, permanent: bool) -> None:
    if job is None:
        return
    job.meta[META_ERROR] = message
    if permanent:
        job.retries_left = 0  # retrying cannot fix it; the worker reads this on failure
    try:
        retry_redis("record a job's error", job.save_meta, context.settings.redis_retry_seconds)
    except Exception:  # Redis gone for good: the traceback still records the failure
        log.exception("could not record the failure of job %s", job.id)


def run_job(
    request: ExplainRequest, job_id: str, context: WorkerContext, job: Any = None
) -> dict[str, Any]:
    settings, store = context.settings, context.store
    check_image_count(len(request.images), settings)
    loaded = context.models.get(request.model)
    for name in request.layers_needed:  # before any image is decoded
        problem = loaded.bundle.layer_problem(name)
        if problem is not None:
            raise JobError(problem)
    originals = [
        decode_image(
            _image_bytes(im, job_id, store),
            max_pixels=settings.max_pixels,
            name=f"image {im.name!r}",
        )
        for im in request.images
    ]
    batch = torch.from_numpy(loaded.spec.apply_batch(originals))
    methods = [
        make_method(m, request.layer, request.effective_activation_layer) for m in request.methods
    ]
    n = len(originals)
    log.info(
        "explaining %d image(s) with %s on %s: %s",
        n,
        loaded.bundle.tag,
        loaded.device,
        ", ".join(m.value for m in request.methods),
    )
    _progress(job, context, 0, n)

    entries: list[dict[str, Any]] = []
    shapes: dict[str, list[int]] = {}
    for start, end, ex in explain_in_chunks(
        loaded.model, batch, methods, request.targets, settings.explain_chunk_size, loaded.device
    ):
        maps = {}
        for method in methods:
            shapes[method.name] = [int(d) for d in ex.results[method.name].maps.shape[-2:]]
            upsampled = ex.upsampled(method.name)
            maps[method.name] = (upsampled, normalise(upsampled, method.display_quantile))
        for i in range(start, end):
            original: Image.Image = originals[i]
            entry = render_image(store, job_id, request, loaded, original, i, ex, i - start, maps)
            if request.faithfulness:
                entry["faithfulness"] = faithfulness.score_maps(
                    loaded.model,
                    batch[i],
                    {m.value: maps[m.value][0][i - start] for m in request.methods},
                    int(ex.targets[i - start]),
                    chunk_size=settings.explain_chunk_size,
                    device=loaded.device,
                )
            entries.append(entry)
        _progress(job, context, end, n)

    input_size = [loaded.spec.crop_size, loaded.spec.crop_size]
    described = describe_maps(methods, shapes, input_size)
    manifest = build_manifest(job_id, request, loaded, entries, described)
    if request.faithfulness:
        manifest["faithfulness"] = faithfulness.describe()
    write_manifest(store, job_id, manifest)
    log.info("job %s: %d image(s) explained, manifest written", job_id, n)
    return {"manifest": "manifest.json", "images": n, "model": loaded.bundle.tag}


def _progress(job: Any, context: WorkerContext, done: int, total: int) -> None:
    if job is not None:
        job.meta[META_PROGRESS] = {"done": done, "total": total}
        retry_redis("record job progress", job.save_meta, context.settings.redis_retry_seconds)


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
