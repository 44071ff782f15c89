"""The RQ job function, `explain(payload)` (lantern.core.jobs.JOB_FUNCTION).

A job: validate the payload (lantern.core.jobs.ExplainRequest), take the model version it
names from the worker's model cache, decode the images with the one decoder the API uses
too (lantern.core.images), run the engine chunk by chunk, render each image's maps and
write them to the worker's artifact store under the job id (workers.manifest), score each
map with deletion and insertion curves when the request asks for faithfulness
(workers.faithfulness), report progress in job.meta, and write manifest.json last.
Everything it needs comes from the worker's context (workers.context).

Jobs explained together (workers.worker.ExplainWorker groups queued jobs for the same
model, layers and methods): the worker first calls `prepare_group`, which validates and
decodes every job's images and runs the engine once over all of them, chunk by chunk;
each job's `explain` then takes its own slice of that pass from the context and renders,
writes and reports as if it had run alone. A job whose payload or images are bad is
left out of the shared pass and fails in its own `explain` with its own reason.

Errors a person can fix (a bad payload, an unreadable image, an unknown model, a layer
that does not exist or is no convolutional feature map, an unknown class) fail the job
at once with a readable reason and are not retried; anything else is retried while the
job has retries left.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from rq.timeouts import JobTimeoutException

from lantern.core.errors import JobError, LanternError
from lantern.core.images import decode_image
from lantern.core.jobs import (
    DEFAULT_LAYER,
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
from workers.engine import (
    Explanation,
    explain_in_chunks,
    explain_top_classes_in_chunks,
    normalise,
)
from workers.manifest import build_manifest, describe_maps, render_image, render_ranks
from workers.methods import make_method
from workers.methods.base import ExplanationMethod, MethodResult
from workers.model_cache import LoadedModel

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
    prepared = context.prepared.pop(job_id, None)
    try:
        request = parse_request(payload)
        if not isinstance(prepared, Prepared) or prepared.request != request:
            prepared = None
        return run_job(request, job_id, context, job, prepared)
    except LanternError as e:
        _record_failure(job, context, str(e), permanent=True)
        raise
    except torch.OutOfMemoryError as e:
        message = f"out of GPU memory even one image at a time: {e}"
        _record_failure(job, context, message, permanent=False)
        raise
    except JobTimeoutException:
        # A configured limit, not a bug: RQ retries or fails the job, and its status says
        # which limit and setting (lantern.core.jobs._readable_error).
        raise
    except OSError as e:
        # The disk, not the code (a full or read-only artifact volume, a file where a
        # directory should be): said so, and retried, since space may come back.
        message = (
            f"a file could not be written or read ({type(e).__name__}: {e}); check the "
            "artifact store (LANTERN_ARTIFACT_DIR: free space, permissions)"
        )
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


@dataclass(frozen=True)
class Prepared:
    """One job's share of a group's shared pass: its request, decoded images, model
    inputs and the engine's results for exactly its images."""

    request: ExplainRequest
    loaded: LoadedModel
    originals: list[Image.Image]
    batch: torch.Tensor
    explanation: Explanation
    maps: dict[str, tuple[torch.Tensor, torch.Tensor]]  # method: (upsampled, normalised)


def group_key(payload: Any) -> tuple[Any, ...] | None:
    """What jobs must share to be explained in one pass (model tag, methods in any order,
    layer, activation layer, compare_top), read from a raw payload without validating it;
    None for a payload that is not even shaped like one (it then runs alone)."""
    if not isinstance(payload, dict):
        return None
    try:
        layer = payload.get("layer") or DEFAULT_LAYER
        return (
            str(payload["model"]),
            tuple(sorted(str(m) for m in payload["methods"])),
            str(layer),
            str(payload.get("activation_layer") or layer),
            payload.get("compare_top"),
        )
    except (KeyError, TypeError):
        return None


def payload_images(payload: Any) -> int:
    """Images in a raw payload (0 when it has no image list)."""
    images = payload.get("images") if isinstance(payload, dict) else None
    return len(images) if isinstance(images, list) else 0


def _checked(
    request: ExplainRequest, job_id: str, context: WorkerContext
) -> tuple[LoadedModel, list[Image.Image], torch.Tensor]:
    """A request's model, decoded images and model inputs; JobError for anything wrong."""
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
    return loaded, originals, batch


def prepare_group(jobs: Sequence[tuple[str, Any]], context: WorkerContext) -> dict[str, Prepared]:
    """Explain the images of several jobs (job id, raw payload) in one chunked pass.

    Jobs that share the first good job's model version, layers and methods get their
    slice of the pass, by job id. A job whose request, model, layer, targets or images
    are wrong is left out (it fails on its own, with its own reason, when it runs), and
    so is one that does not match; an error in the pass itself leaves every job to run
    alone. Each image's results are those of a solo run: the model is in eval mode, so
    the images of a batch do not affect one another.
    """
    members: list[tuple[str, ExplainRequest, LoadedModel, list[Image.Image], torch.Tensor]] = []
    for job_id, payload in jobs:
        try:
            request = parse_request(payload)
            if request.compare_top is not None:
                continue  # k maps per method and image: such a job runs its own pass
            loaded, originals, batch = _checked(request, job_id, context)
            classes = len(loaded.class_names)
            if any(t is not None and t >= classes for t in request.targets):
                continue  # resolve_targets would fail the whole pass
        except LanternError:
            continue
        if members:
            first, first_loaded = members[0][1], members[0][2]
            if (
                loaded.bundle.tag != first_loaded.bundle.tag
                or set(request.methods) != set(first.methods)
                or request.layer != first.layer
                or request.effective_activation_layer != first.effective_activation_layer
            ):
                continue
        members.append((job_id, request, loaded, originals, batch))
    if not members:
        return {}
    first, loaded = members[0][1], members[0][2]
    methods = [make_method(m, first.layer, first.effective_activation_layer) for m in first.methods]
    inputs = torch.cat([m[4] for m in members])
    targets = [t for m in members for t in m[1].targets]
    chunks = [
        ex
        for _, _, ex in explain_in_chunks(
            loaded.model,
            inputs,
            methods,
            targets,
            context.settings.explain_chunk_size,
            loaded.device,
        )
    ]
    whole = _concat(chunks)
    # Upsampled and normalised once for all (per call, normalise costs the same for one
    # map as for a chunk of them); each image is still scaled on its own.
    maps = {m.name: _display_maps(chunks, m) for m in methods if m.has_map}
    prepared: dict[str, Prepared] = {}
    start = 0
    for job_id, request, job_loaded, originals, batch in members:
        end = start + len(originals)
        prepared[job_id] = Prepared(
            request,
            job_loaded,
            originals,
            batch,
            _slice(whole, start, end),
            {k: (up[start:end], norm[start:end]) for k, (up, norm) in maps.items()},
        )
        start = end
    log.info(
        "explained %d image(s) of %d job(s) together with %s on %s",
        int(inputs.shape[0]),
        len(members),
        loaded.bundle.tag,
        loaded.device,
    )
    return prepared


def _display_maps(
    chunks: list[Explanation], method: ExplanationMethod
) -> tuple[torch.Tensor, torch.Tensor]:
    """A method's maps at the input resolution and scaled for display, over all chunks."""
    upsampled = [c.upsampled(method.name) for c in chunks]
    normalised = [normalise(u, method.display_quantile) for u in upsampled]
    return torch.cat(upsampled), torch.cat(normalised)


def _concat(chunks: list[Explanation]) -> Explanation:
    if len(chunks) == 1:
        return chunks[0]
    return Explanation(
        torch.cat([c.logits for c in chunks]),
        torch.cat([c.targets for c in chunks]),
        {
            name: MethodResult(
                torch.cat([c.results[name].maps for c in chunks]),
                {
                    key: torch.cat([c.results[name].extras[key] for c in chunks])
                    for key in result.extras
                },
            )
            for name, result in chunks[0].results.items()
        },
        chunks[0].input_size,
    )


def _slice(ex: Explanation, start: int, end: int) -> Explanation:
    return Explanation(
        ex.logits[start:end],
        ex.targets[start:end],
        {
            name: MethodResult(r.maps[start:end], {k: v[start:end] for k, v in r.extras.items()})
            for name, r in ex.results.items()
        },
        ex.input_size,
    )


def run_job(
    request: ExplainRequest,
    job_id: str,
    context: WorkerContext,
    job: Any = None,
    prepared: Prepared | None = None,
) -> dict[str, Any]:
    settings, store = context.settings, context.store
    if prepared is not None:  # explained with other jobs: only the rendering is left
        loaded, originals, batch = prepared.loaded, prepared.originals, prepared.batch
    else:
        loaded, originals, batch = _checked(request, job_id, context)
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
    k = request.compare_top
    # compare_top: the class-dependent methods get maps for each of the k top classes
    per_class = [m for m in methods if m.needs_layer_gradient or m.needs_input_gradient]
    passes: Any
    if prepared is not None:
        passes = [(0, n, [prepared.explanation])]
    elif k is not None:
        passes = explain_top_classes_in_chunks(
            loaded.model, batch, methods, k, settings.explain_chunk_size, loaded.device
        )
    else:
        passes = (
            (start, end, [ex])
            for start, end, ex in explain_in_chunks(
                loaded.model,
                batch,
                methods,
                request.targets,
                settings.explain_chunk_size,
                loaded.device,
            )
        )
    for start, end, ranked in passes:
        ex = ranked[0]
        maps = {}
        for method in filter(lambda m: m.has_map, methods):  # depth: no one map to draw
            shapes[method.name] = [int(d) for d in ex.results[method.name].maps.shape[-2:]]
            if prepared is not None:
                maps[method.name] = prepared.maps[method.name]
                continue
            maps[method.name] = _display(ex, method)
        rank_maps = [{m.name: maps[m.name] for m in per_class}] + [
            {m.name: _display(other, m) for m in per_class} for other in ranked[1:]
        ]
        for i in range(start, end):
            original: Image.Image = originals[i]
            row = i - start
            entry = render_image(store, job_id, request, loaded, original, i, ex, row, maps)
            if k is not None:
                entry["compare"] = render_ranks(
                    store,
                    job_id,
                    request,
                    loaded,
                    original,
                    i,
                    ranked,
                    row,
                    rank_maps,
                    entry["files"],
                )
            if request.faithfulness:
                score = _scorer(loaded, batch[i], settings.explain_chunk_size)
                entry["faithfulness"] = score(
                    {name: up[row] for name, (up, _) in maps.items()}, ex, row
                )
                for item, r_ex, r_maps in zip(
                    entry.get("compare", []), ranked, rank_maps, strict=k is not None
                ):
                    item["faithfulness"] = (
                        {m: entry["faithfulness"][m] for m in r_maps}
                        if item["rank"] == 1  # the same maps and class: scored above
                        else score({m: up[row] for m, (up, _) in r_maps.items()}, r_ex, row)
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


def _scorer(
    loaded: LoadedModel, image: torch.Tensor, chunk_size: int
) -> Callable[[dict[str, torch.Tensor], Explanation, int], dict[str, dict[str, Any]]]:
    """score(maps, ex, row): the faithfulness of `maps` (method -> upsampled map) for one
    image, against the class `ex` explains in row `row`."""

    def score(
        maps: dict[str, torch.Tensor], ex: Explanation, row: int
    ) -> dict[str, dict[str, Any]]:
        return faithfulness.score_maps(
            loaded.model,
            image,
            maps,
            int(ex.targets[row]),
            chunk_size=chunk_size,
            device=loaded.device,
        )

    return score


def _display(ex: Explanation, method: ExplanationMethod) -> tuple[torch.Tensor, torch.Tensor]:
    """A chunk's maps of `method` at the input resolution, and those scaled for display."""
    upsampled = ex.upsampled(method.name)
    return upsampled, normalise(upsampled, method.display_quantile)


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
