"""The contract between the API service and the explanation workers. Torch-free.

    queue          settings.queue ("lantern-explain"), RQ's JSONSerializer (never pickle) and
                   lantern.core.safe_job.LanternJob, which refuses any job that names another
                   function, an instance or a callback: whoever can write to Redis cannot
                   make a worker run code
    job function   JOB_FUNCTION, "workers.tasks.explain", referenced by name: the service
                   never imports workers (nor torch)
    payload        ExplainRequest, one JSON object, the job's only argument
    job id         make_job_id(): "ex-" + 32 hex digits of a SHA-256 over the image bytes,
                   the model version, the methods, the targets, the layers, whether
                   faithfulness curves are wanted and how many top classes to compare
                   (compare_top); an identical request names the same job,
                   so find_or_enqueue() reuses a finished one (unless forced to recompute)
    progress       job.meta["progress"] = {"done": images done, "total": images}
    request id     job.meta["request_id"], optional: the id of the HTTP request that
                   enqueued the job (its X-Request-ID, or one the API generated;
                   lantern.core.logs), which the worker puts on its log lines for the job.
                   Metadata, not payload: the job's one argument stays the ExplainRequest,
                   and a job without it (older API, another client) runs the same
    results        the artifact store (lantern.core.store) under the job id; manifest.json last
    status         job_status() -> JobStatus + progress + a readable error + the manifest

The Redis connection is always passed in.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re
from collections import Counter
from collections.abc import Sequence
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lantern.core.errors import JobError
from lantern.core.settings import Settings
from lantern.core.store import (
    INPUTS_DIR,
    ArtifactStore,
    read_manifest,
)

if TYPE_CHECKING:
    from redis import Redis
    from rq import Queue
    from rq.job import Job

JOB_FUNCTION = "workers.tasks.explain"
PAYLOAD_VERSION = 1
DEFAULT_LAYER = "layer4"  # the last convolutional stage of a ResNet (models.network)
JOB_ID_PREFIX = "ex-"
EXPLAIN_JOB_ID_RE = re.compile(r"ex-[0-9a-f]{32}")
IMAGE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
LAYER_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*")
META_PROGRESS = "progress"
META_ERROR = "error"
META_REQUEST_ID = "request_id"


class Method(StrEnum):
    GRADCAM = "gradcam"
    GRADCAM_PP = "gradcam_pp"
    SALIENCY = "saliency"
    ACTIVATIONS = "activations"
    LAYERCAM = "layercam"
    DEPTH = "depth"


# The methods that read the request's layer (not saliency, which reads the input's gradient,
# nor depth, which reads its own fixed stages, DEPTH_LAYERS); tests/test_methods.py checks
# this against each implementation's `needs_layer`.
LAYER_METHODS = frozenset({Method.GRADCAM, Method.GRADCAM_PP, Method.LAYERCAM, Method.ACTIVATIONS})
# The methods whose map depends on the class explained (they read a gradient of its score):
# the ones compare_top draws once per class. tests/test_methods.py checks this against
# each implementation's needs_layer_gradient / needs_input_gradient.
CLASS_METHODS = frozenset({Method.GRADCAM, Method.GRADCAM_PP, Method.LAYERCAM, Method.SALIENCY})
# What 'depth' shows: the stem (after conv1, bn1 and its ReLU) and the four stages of a
# ResNet (models.network), shallow to deep; the door checks them like any layer.
DEPTH_LAYERS = ("relu", "layer1", "layer2", "layer3", "layer4")
# compare_top=k: the maps of each image's k most probable classes in one job.
COMPARE_TOP_MIN, COMPARE_TOP_MAX = 2, 5


def layers_needed(
    methods: Sequence[Method | str], layer: str, activation_layer: str | None
) -> list[str]:
    """The layers a request's methods read: `layer` for Grad-CAM(++) and LayerCAM,
    `activation_layer` (default `layer`) for activations, DEPTH_LAYERS for depth; none
    for saliency alone."""
    chosen = {Method(str(m)) for m in methods}
    needed = []
    if chosen & {Method.GRADCAM, Method.GRADCAM_PP, Method.LAYERCAM}:
        needed.append(layer)
    if Method.ACTIVATIONS in chosen:
        needed.append(activation_layer or layer)
    if Method.DEPTH in chosen:
        needed.extend(DEPTH_LAYERS)
    return list(dict.fromkeys(needed))


def parse_methods(text: str) -> list[Method]:
    """'gradcam, saliency' -> [Method.GRADCAM, Method.SALIENCY] (repeats dropped, order
    kept); ValueError naming the choices for an empty list or an unknown name."""
    choices = ", ".join(m.value for m in Method)
    names = [m.strip().lower() for m in text.split(",") if m.strip()]
    if not names:
        raise ValueError(f"methods is empty; choose from {choices}")
    unknown = [n for n in names if n not in Method._value2member_map_]
    if unknown:
        raise ValueError(f"unknown method {', '.join(map(repr, unknown))}; choose from {choices}")
    return list(dict.fromkeys(Method(n) for n in names))


def compare_top_problem(
    compare_top: int, methods: Sequence[Method | str], explicit_targets: bool
) -> str | None:
    """Why a request cannot compare its top `compare_top` classes, or None if it can."""
    if not COMPARE_TOP_MIN <= compare_top <= COMPARE_TOP_MAX:
        return (
            f"compare_top must be a number of classes from {COMPARE_TOP_MIN} to "
            f"{COMPARE_TOP_MAX}, not {compare_top}"
        )
    if explicit_targets:
        return (
            "compare_top explains each image's most probable classes, so it cannot be "
            "combined with targets; send one or the other"
        )
    if not {Method(str(m)) for m in methods} & CLASS_METHODS:
        choices = ", ".join(sorted(m.value for m in CLASS_METHODS))
        return (
            "compare_top compares maps that depend on the class explained; add at least "
            f"one of {choices} to methods"
        )
    return None


def check_layer_name(name: str) -> str:
    """`name` if it is a module path like 'layer4' or 'layer3.1.conv2'; else ValueError."""
    if not LAYER_RE.fullmatch(name):
        raise ValueError(f"{name!r} is not a layer name like 'layer4' or 'layer3.1.conv2'")
    return name


class JobStatus(StrEnum):
    QUEUED = "queued"
    STARTED = "started"
    FINISHED = "finished"
    FAILED = "failed"


# --- the payload ----------------------------------------------------------------------


class ExplainImage(BaseModel):
    """One input image: its bytes inline (base64) or a reference into the job's store."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Stem for the artifact files: letters, digits, _ and -.")
    data_b64: str | None = Field(None, description="The encoded image file, base64.")
    ref: str | None = Field(None, description=f"'{INPUTS_DIR}/<name>' in this job's store.")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not IMAGE_NAME_RE.fullmatch(v):
            raise ValueError(f"image name {v!r} must match {IMAGE_NAME_RE.pattern}")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> ExplainImage:
        if (self.data_b64 is None) == (self.ref is None):
            raise ValueError(f"image {self.name!r} needs exactly one of data_b64 and ref")
        if self.ref is not None and self.ref != f"{INPUTS_DIR}/{self.name}":
            raise ValueError(f"image {self.name!r}: ref must be '{INPUTS_DIR}/{self.name}'")
        return self

    def image_bytes(self) -> bytes | None:
        """The decoded inline bytes (None for a reference)."""
        if self.data_b64 is None:
            return None
        try:
            return base64.b64decode(self.data_b64, validate=True)
        except ValueError:
            raise JobError(f"image {self.name!r}: data_b64 is not valid base64") from None


class ExplainRequest(BaseModel):
    """The job payload: what to explain, with which model, how."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    version: int = Field(PAYLOAD_VERSION, description="Payload schema version.")
    model: str = Field(description="Model tag, a concrete version: 'lantern-classifier:<v>'.")
    methods: list[Method] = Field(min_length=1)
    targets: list[int | None] = Field(
        description="One per image: the class to explain, or None for its own top-1."
    )
    layer: str = Field(DEFAULT_LAYER, description="Layer for Grad-CAM and Grad-CAM++.")
    activation_layer: str | None = Field(
        None, description="Layer whose feature maps 'activations' shows (default: layer)."
    )
    faithfulness: bool = Field(
        False,
        description="Also score every map with deletion and insertion curves against a "
        "random-order baseline (workers.faithfulness).",
    )
    compare_top: int | None = Field(
        None,
        description=f"Also explain each image's {COMPARE_TOP_MIN}..{COMPARE_TOP_MAX} most "
        "probable classes, each with its own maps (targets must then all be null).",
    )
    images: list[ExplainImage] = Field(min_length=1)

    @field_validator("version")
    @classmethod
    def _version(cls, v: int) -> int:
        if v != PAYLOAD_VERSION:
            raise ValueError(f"payload version {v} is not supported (expected {PAYLOAD_VERSION})")
        return v

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+(:[A-Za-z0-9_.-]+)?", v):
            raise ValueError(f"{v!r} is not a model tag")
        return v

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: list[Method]) -> list[Method]:
        if len(set(v)) != len(v):
            raise ValueError("methods must not repeat")
        return v

    @field_validator("targets")
    @classmethod
    def _targets(cls, v: list[int | None]) -> list[int | None]:
        if any(t is not None and t < 0 for t in v):
            raise ValueError("targets must be class indices >= 0 or null")
        return v

    @field_validator("layer", "activation_layer")
    @classmethod
    def _layer(cls, v: str | None) -> str | None:
        return None if v is None else check_layer_name(v)

    @model_validator(mode="after")
    def _consistent(self) -> ExplainRequest:
        if len(self.targets) != len(self.images):
            raise ValueError(
                f"{len(self.targets)} targets for {len(self.images)} images: give one per "
                "image (null for its own top-1 class)"
            )
        names = [im.name for im in self.images]
        if len(set(names)) != len(names):
            raise ValueError("image names must be unique within a job")
        if self.compare_top is not None:
            explicit = any(t is not None for t in self.targets)
            problem = compare_top_problem(self.compare_top, self.methods, explicit)
            if problem is not None:
                raise ValueError(problem)
        return self

    @property
    def effective_activation_layer(self) -> str:
        return self.activation_layer or self.layer

    @property
    def layers_needed(self) -> list[str]:
        return layers_needed(self.methods, self.layer, self.activation_layer)


def parse_request(payload: Any) -> ExplainRequest:
    """Validate a payload; the error says which field is wrong and why."""
    try:
        return ExplainRequest.model_validate(payload)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'payload'}: {err['msg']}"
            for err in e.errors()
        )
        raise JobError(f"invalid explanation request: {problems}") from None


# --- job ids ---------------------------------------------------------------------------


def make_job_id(
    images: Sequence[tuple[str, bytes]],
    model: str,
    methods: Sequence[Method | str],
    targets: Sequence[int | None] | None,
    layer: str = DEFAULT_LAYER,
    activation_layer: str | None = None,
    faithfulness: bool = False,
    compare_top: int | None = None,
) -> str:
    """'ex-' + 32 hex digits: identical requests (same bytes, names, model version, methods
    in any order, targets, layers, faithfulness, compare_top) get the same id. A request
    without faithfulness or compare_top keeps the id it had before those options existed."""
    key = {
        "v": PAYLOAD_VERSION,
        "model": model,
        "methods": sorted(str(Method(m)) for m in methods),
        "targets": list(targets) if targets is not None else [None] * len(images),
        "layer": layer,
        "activation_layer": activation_layer or layer,
        "images": [[name, hashlib.sha256(data).hexdigest()] for name, data in images],
    }
    if faithfulness:
        key["faithfulness"] = True
    if compare_top is not None:
        key["compare_top"] = compare_top
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return JOB_ID_PREFIX + digest[:32]


def is_explain_job_id(job_id: str) -> bool:
    return isinstance(job_id, str) and EXPLAIN_JOB_ID_RE.fullmatch(job_id) is not None


def image_stem(filename: str | None) -> str:
    """An upload's file name, sanitised to a valid image name ("my cat.jpg" -> "my_cat");
    "" when nothing usable is left."""
    stem = (filename or "").rsplit("/", 1)[-1].rsplit("\\", 1)[-1].rsplit(".", 1)[0]
    return re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_-")[:48]


def image_name(filename: str | None, index: int) -> str:
    """The indexed name of upload `index` ("my cat.jpg", 0 -> "00-my_cat"; no usable
    name -> "image-00"), for a name that is empty or not unique in its request."""
    stem = image_stem(filename)
    return f"{index:02d}-{stem}" if stem else f"image-{index:02d}"


def image_names(filenames: Sequence[str | None]) -> list[str]:
    """The names a request's images go by, so results match the uploads by the name the
    user sent: each upload's sanitised stem ("cats/tom.jpg" -> "tom") when no other
    upload in the request has it; the index is added only to an empty or repeated stem
    (two "a.png" -> "00-a", "01-a"), and a name is never given twice."""
    stems = [image_stem(f) for f in filenames]
    counts = Counter(stems)
    unique = {stem for stem in stems if stem and counts[stem] == 1}
    taken: set[str] = set(unique)
    names = []
    for index, (filename, stem) in enumerate(zip(filenames, stems, strict=True)):
        if stem in unique:
            names.append(stem)
            continue
        base = name = image_name(filename, index)
        extra = 1
        while name in taken:  # "00-a" was itself an upload's name
            extra += 1
            name = f"{base}-{extra}"
        taken.add(name)
        names.append(name)
    return names


# --- enqueue, find, status ---------------------------------------------------------------


def explain_queue(connection: Redis, settings: Settings) -> Queue:
    """The explanation queue, always with the JSON serializer and the allow-listing job class."""
    from rq import Queue
    from rq.serializers import JSONSerializer

    from lantern.core.safe_job import LanternJob

    return Queue(
        settings.queue, connection=connection, serializer=JSONSerializer, job_class=LanternJob
    )


def check_image_count(n: int, settings: Settings) -> None:
    """The one rule for how many images a job may carry (checked on enqueue and again by
    the worker, which may be handed a job Lantern's API did not write)."""
    if n < 1:
        raise JobError("an explanation needs at least one image")
    if n > settings.max_images_per_job:
        raise JobError(f"{n} images in one job; the limit is {settings.max_images_per_job}")


def build_request(
    job_id: str,
    images: Sequence[tuple[str, bytes]],
    model: str,
    methods: Sequence[Method | str],
    targets: Sequence[int | None] | None,
    layer: str,
    activation_layer: str | None,
    store: ArtifactStore,
    settings: Settings,
    faithfulness: bool = False,
    compare_top: int | None = None,
) -> ExplainRequest:
    """The payload; images over settings.inline_image_bytes are written to the store."""
    items: list[dict[str, Any]] = []
    for name, data in images:
        if len(data) <= settings.inline_image_bytes:
            items.append({"name": name, "data_b64": base64.b64encode(data).decode()})
        else:
            ref = f"{INPUTS_DIR}/{name}"
            store.write(job_id, ref, data)
            items.append({"name": name, "ref": ref})
    return parse_request(
        {
            "model": model,
            "methods": [str(Method(m)) for m in methods],
            "targets": list(targets) if targets is not None else [None] * len(images),
            "layer": layer,
            "activation_layer": activation_layer,
            "faithfulness": faithfulness,
            **({"compare_top": compare_top} if compare_top is not None else {}),
            "images": items,
        }
    )


def enqueue_explain(
    connection: Redis,
    request: ExplainRequest,
    job_id: str,
    settings: Settings,
    request_id: str | None = None,
) -> Job:
    """Put `request` on the queue as job `job_id`; DuplicateJobError if it already exists.
    `request_id` goes into job.meta (META_REQUEST_ID) when given."""
    from rq import Retry

    if not is_explain_job_id(job_id):
        raise JobError(f"{job_id!r} is not an explanation job id ('ex-' and 32 hex digits)")
    n = len(request.images)
    return explain_queue(connection, settings).enqueue(
        JOB_FUNCTION,
        args=(request.model_dump(mode="json"),),
        job_id=job_id,
        unique=True,
        description=f"explain {n} image(s) with {request.model}: "
        f"{', '.join(m.value for m in request.methods)}",
        meta={
            META_PROGRESS: {"done": 0, "total": n},
            **({META_REQUEST_ID: request_id} if request_id else {}),
        },
        job_timeout=settings.job_timeout_seconds,
        ttl=settings.job_ttl_seconds,  # longest it may wait in the queue
        result_ttl=settings.job_ttl_seconds,
        failure_ttl=settings.job_ttl_seconds,
        retry=Retry(max=settings.job_retries) if settings.job_retries > 0 else None,
    )


def find_or_enqueue(
    connection: Redis,
    store: ArtifactStore,
    images: Sequence[tuple[str, bytes]],
    model: str,
    methods: Sequence[Method | str],
    targets: Sequence[int | None] | None = None,
    layer: str = DEFAULT_LAYER,
    activation_layer: str | None = None,
    *,
    settings: Settings,
    faithfulness: bool = False,
    compare_top: int | None = None,
    force: bool = False,
    request_id: str | None = None,
) -> tuple[str, bool]:
    """(job id, whether a new job was enqueued).

    An identical request that is queued, running or finished is found instead of being
    computed again; one that failed, or whose job has expired from Redis without leaving
    a manifest, is enqueued afresh. With `force`, a finished one is recomputed too: its
    job and its files (manifest first) are deleted and it is enqueued afresh under the
    same id; one still queued or running is returned as it is, since it is being
    computed now. `model` should be a concrete version, not ':latest', or the id cannot
    tell model versions apart. `request_id` is recorded in the metadata of a job enqueued
    now (a job found instead keeps the id of the request that enqueued it).
    """
    from rq.exceptions import DuplicateJobError

    check_image_count(len(images), settings)
    job_id = make_job_id(
        images, model, methods, targets, layer, activation_layer, faithfulness, compare_top
    )
    current = job_status(connection, job_id, store, settings)
    done = (JobStatus.FAILED, JobStatus.FINISHED) if force else (JobStatus.FAILED,)
    if current is not None and current["status"] not in done:
        return job_id, False
    if current is not None:  # failed (or forced): clear the old attempt and run it again
        _delete_job(connection, job_id, settings)
        if current["status"] == JobStatus.FINISHED:
            store.delete(job_id)
    request = build_request(
        job_id,
        images,
        model,
        methods,
        targets,
        layer,
        activation_layer,
        store,
        settings,
        faithfulness=faithfulness,
        compare_top=compare_top,
    )
    try:
        enqueue_explain(connection, request, job_id, settings, request_id=request_id)
    except DuplicateJobError:  # an identical request enqueued it a moment ago
        return job_id, False
    return job_id, True


def job_status(
    connection: Redis,
    job_id: str,
    store: ArtifactStore | None,
    settings: Settings,
) -> dict[str, Any] | None:
    """{"id", "status", "progress": {"done", "total"}, "error", "manifest"}, or None if
    no such job exists (in Redis, or as a finished manifest in the store)."""
    from rq.exceptions import NoSuchJobError
    from rq.job import Job
    from rq.serializers import JSONSerializer

    if not is_explain_job_id(job_id):
        return None
    try:
        job = Job.fetch(job_id, connection=connection, serializer=JSONSerializer)
    except NoSuchJobError:
        job = None
    except (ValueError, TypeError, KeyError, UnicodeDecodeError):
        # A record Lantern did not write (workers refuse such jobs the same way).
        return _status_dict(
            job_id,
            JobStatus.FAILED,
            0,
            0,
            "refused: not a Lantern job (its record cannot be read)",
            None,
        )
    manifest = read_manifest(store, job_id) if store is not None else None

    if job is None:
        if manifest is None:
            return None
        # Redis forgot the job (restart without persistence, expiry); the files remain.
        return _finished(job_id, manifest)

    rq_status = _rq_status(job)
    status = _STATUS_MAP.get(rq_status, JobStatus.QUEUED)
    progress = (job.meta or {}).get(META_PROGRESS, {})
    done, total = int(progress.get("done", 0)), int(progress.get("total", 0))
    error = _readable_error(job, settings) if status == JobStatus.FAILED else None
    if status == JobStatus.FINISHED and manifest is None and store is not None:
        status, error = JobStatus.FAILED, "the job finished but its artifacts are missing"
    return _status_dict(
        job_id, status, done, total, error, manifest if status == JobStatus.FINISHED else None
    )


def finished_from_manifest(store: ArtifactStore, job_id: str) -> dict[str, Any] | None:
    """The status of a finished job read from its manifest alone (no Redis), or None
    without one: the manifest is written last, so its presence means "finished"."""
    manifest = read_manifest(store, job_id)
    return None if manifest is None else _finished(job_id, manifest)


def _finished(job_id: str, manifest: dict[str, Any]) -> dict[str, Any]:
    n = len(manifest.get("images", []))
    return _status_dict(job_id, JobStatus.FINISHED, n, n, None, manifest)


_STATUS_MAP = {
    "queued": JobStatus.QUEUED,
    "deferred": JobStatus.QUEUED,
    "scheduled": JobStatus.QUEUED,
    "created": JobStatus.QUEUED,
    "started": JobStatus.STARTED,
    "finished": JobStatus.FINISHED,
    "failed": JobStatus.FAILED,
    "stopped": JobStatus.FAILED,
    "canceled": JobStatus.FAILED,
}


def _rq_status(job: Job) -> str:
    status = job.get_status(refresh=False)
    return str(getattr(status, "value", status))


def _status_dict(
    job_id: str,
    status: JobStatus,
    done: int,
    total: int,
    error: str | None,
    manifest: dict[str, Any] | None,
) -> dict[str, Any]:
    return {
        "id": job_id,
        "status": status,
        "progress": {"done": done, "total": total},
        "error": error,
        "manifest": manifest,
    }


def _readable_error(job: Job, settings: Settings) -> str:
    """What went wrong, for a person: the worker's own message when it left one."""
    meta_error = (job.meta or {}).get(META_ERROR)
    if meta_error:
        return str(meta_error)
    result = job.latest_result()
    exc = (result.exc_string or "") if result is not None else ""
    if "AbandonedJobError" in exc:
        return (
            "the worker running this job stopped (killed or crashed) and no retries were "
            "left; submit the request again"
        )
    if "JobTimeoutException" in exc:
        return (
            f"the job took longer than {job.timeout or settings.job_timeout_seconds} s "
            "(job_timeout_seconds); send fewer images per request"
        )
    if "DeserializationError" in exc:
        return "the job's payload is not JSON; it was not enqueued by Lantern"
    if _rq_status(job) in ("stopped", "canceled"):
        return "the job was stopped"
    last = exc.strip().splitlines()[-1] if exc.strip() else ""
    return last or "the job failed without a message"


def _delete_job(connection: Redis, job_id: str, settings: Settings) -> None:
    from rq.exceptions import NoSuchJobError
    from rq.job import Job
    from rq.serializers import JSONSerializer

    with contextlib.suppress(NoSuchJobError):
        Job.fetch(job_id, connection=connection, serializer=JSONSerializer).delete()
