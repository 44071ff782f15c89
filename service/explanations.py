"""Explanation jobs as the API sees them: validate, enqueue (or find), report, serve files.

Torch-free: the work itself happens in the workers; this side speaks the contract in
`lantern.core.jobs` and reads results from the artifact store. Errors are raised as
`lantern.core.errors` types; `service.api` turns them into HTTP responses.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from lantern.core.bundle import Bundle, load_bundle
from lantern.core.errors import (
    InputError,
    InvalidAddress,
    JobNotFound,
    ModelError,
    QueueUnavailable,
    UnknownModel,
    UnprocessableInput,
)
from lantern.core.jobs import (
    COMPARE_TOP_MAX,
    COMPARE_TOP_MIN,
    DEFAULT_LAYER,
    JobStatus,
    Method,
    check_layer_name,
    compare_top_problem,
    find_or_enqueue,
    finished_from_manifest,
    image_names,
    is_explain_job_id,
    job_status,
    layers_needed,
    parse_methods,
)
from lantern.core.settings import Settings
from lantern.core.store import check_file_name, open_store

T = TypeVar("T")

CONTENT_TYPES = {".png": "image/png", ".npy": "application/octet-stream"}
# A Redis command takes well under a millisecond; this long is an outage, not load (an
# fsync stall under appendfsync always on a slow disk stays far below it).
REDIS_TIMEOUT_S = 2.0
THREADS = 16  # explanation requests waiting at once on Redis or the artifact store
_INPUT_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}


# A model version ("<version>", "latest") or a whole tag ("<name>:<version>"), as
# BentoML spells them (it lowercases what it is given).
MODEL_RE = re.compile(r"(?:[A-Za-z0-9][A-Za-z0-9_.-]{0,62}:)?[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off", ""}


@dataclass(frozen=True)
class ExplainOptions:
    methods: list[Method]
    targets: list[int | None] | None
    layer: str
    activation_layer: str | None
    model: str | None = None  # a concrete tag; None: the model the service serves
    force: bool = False
    faithfulness: bool = False
    compare_top: int | None = None  # the maps of each image's top-k classes


def parse_flag(params: dict[str, str], name: str) -> bool:
    """A boolean option sent as text: true/1/yes/on or false/0/no/off (or empty)."""
    value = str(params.get(name, "")).strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise UnprocessableInput(f"{name} must be true or false, not {params[name][:40]!r}")


def resolve_model(value: str | None, served: Bundle) -> Bundle:
    """The bundle a request names: `served` when it names none, else a version of the
    served model ("<version>" or "latest") or a whole tag ("<name>:<version>") in the
    model store. 422 for something that is no tag, 404 for one the store lacks."""
    value = (value or "").strip()
    if not value:
        return served
    if not MODEL_RE.fullmatch(value):
        raise UnprocessableInput(
            f"model {value[:80]!r} is not a model version: give a version of "
            f"{served.tag.split(':', 1)[0]!r} such as {served.version!r}, or a whole tag"
        )
    tag = value if ":" in value else f"{served.tag.split(':', 1)[0]}:{value}"
    try:
        return load_bundle(tag)
    except ModelError:
        raise UnknownModel(
            f"the model store has no model {tag!r}; the service serves {served.tag} "
            "(`lantern models list` shows every version)"
        ) from None
    except Exception as e:  # BentoML refusing the tag itself
        raise UnprocessableInput(f"model {value[:80]!r} is not a valid model tag: {e}") from None


def parse_options(
    params: dict[str, str], n_images: int, class_names: list[str], bundle: Bundle | None = None
) -> ExplainOptions:
    """methods / targets / layer / activation_layer / force / faithfulness / compare_top
    from query or form values, checked; with `bundle` (the model the request explains:
    targets are its classes), each layer the methods read must be one of its explainable layers (a
    bundle that does not record them accepts any syntactically valid name), and the
    options name its tag."""
    force = parse_flag(params, "force")
    faithfulness = parse_flag(params, "faithfulness")
    try:
        methods = parse_methods(params.get("methods", Method.GRADCAM.value))
    except ValueError as e:
        raise UnprocessableInput(str(e)) from None

    targets: list[int | None] | None = None
    if params.get("targets", "").strip():
        entries = params["targets"].split(",")
        if len(entries) != n_images:
            raise UnprocessableInput(
                f"targets has {len(entries)} entries for {n_images} image(s); give one per "
                "image, comma-separated, an empty entry meaning the image's own top class"
            )
        targets = [_target(e.strip(), class_names) for e in entries]

    layer = params.get("layer", "").strip() or DEFAULT_LAYER
    activation_layer = params.get("activation_layer", "").strip() or None
    for name in filter(None, (layer, activation_layer)):
        try:
            check_layer_name(name)
        except ValueError as e:
            raise UnprocessableInput(str(e)) from None
    if bundle is not None:
        for name in layers_needed(methods, layer, activation_layer):
            problem = bundle.layer_problem(name)
            if problem is not None:
                raise UnprocessableInput(problem)
    compare_top = _compare_top(params, methods, targets is not None, len(class_names))
    model = bundle.tag if bundle is not None else None
    return ExplainOptions(
        methods,
        targets,
        layer,
        activation_layer,
        model,
        force=force,
        faithfulness=faithfulness,
        compare_top=compare_top,
    )


def _compare_top(
    params: dict[str, str], methods: list[Method], explicit_targets: bool, classes: int
) -> int | None:
    """compare_top sent as text: None when absent or empty, else k in
    COMPARE_TOP_MIN..COMPARE_TOP_MAX (and at most the model's classes), without targets
    and with at least one method whose map depends on the class; 422 otherwise."""
    text = str(params.get("compare_top", "")).strip()
    if not text:
        return None
    if not re.fullmatch(r"\d{1,3}", text):
        raise UnprocessableInput(
            f"compare_top must be a number of classes from {COMPARE_TOP_MIN} to "
            f"{COMPARE_TOP_MAX}, not {text[:40]!r}"
        )
    k = int(text)
    problem = compare_top_problem(k, methods, explicit_targets)
    if problem is not None:
        raise UnprocessableInput(problem)
    if k > classes:
        raise UnprocessableInput(
            f"compare_top={k} asks for more classes than this model has ({classes})"
        )
    return k


def _target(entry: str, class_names: list[str]) -> int | None:
    if entry == "":
        return None
    if re.fullmatch(r"\d+", entry):
        index = int(entry)
    elif entry in class_names:
        index = class_names.index(entry)
    else:
        raise UnprocessableInput(
            f"target {entry!r} is neither a class index nor a class name of this model"
        )
    if not 0 <= index < len(class_names):
        raise UnprocessableInput(
            f"target {index} is out of range; this model has classes 0..{len(class_names) - 1}"
        )
    return index


class Explanations:
    """The API's side of explanation jobs, with its Redis connection and artifact store."""

    def __init__(self, settings: Settings, bundle: Bundle):
        self.settings = settings
        self.bundle = bundle
        self.store = open_store(settings)
        # Connects lazily: the API starts, and /predict works, with Redis down.
        # Few, quick retries, of refused or dropped connections only: one reconnects a
        # pooled connection after a Redis restart. A timeout is not retried: a hung Redis
        # (a network partition) would hold the request REDIS_TIMEOUT_S per try, when it
        # could answer 503, or 200 from a finished job's manifest.
        self.redis = redis.Redis.from_url(
            settings.redis_url,
            socket_connect_timeout=REDIS_TIMEOUT_S,
            socket_timeout=REDIS_TIMEOUT_S,
            retry=Retry(
                ExponentialBackoff(cap=0.2, base=0.05),
                2,
                supported_errors=(redis.exceptions.ConnectionError,),
            ),
        )
        # Threads of its own for the calls that wait on Redis or the artifact store, so
        # that a hung Redis holds these, not anyio's shared pool (/status, BentoML).
        self.threads = anyio.CapacityLimiter(THREADS)

    async def in_thread(self, func: Callable[..., T], *args: Any) -> T:
        """`func(*args)` (one of the methods below) awaited on this side's own threads."""
        return await anyio.to_thread.run_sync(func, *args, limiter=self.threads)

    def submit(
        self,
        images: list[tuple[str | None, bytes]],
        options: ExplainOptions,
        request_id: str | None = None,
    ) -> tuple[dict[str, Any], bool]:
        """(status, created): a new job, or the identical one that exists already. A new
        job records `request_id` (the HTTP request that asked for it) in its metadata."""
        names = image_names([filename for filename, _ in images])
        named = list(zip(names, (data for _, data in images), strict=True))
        with _queue_errors():
            job_id, created = find_or_enqueue(
                self.redis,
                self.store,
                named,
                # a concrete version, so ids tell versions apart
                options.model or self.bundle.tag,
                options.methods,
                options.targets,
                options.layer,
                options.activation_layer,
                settings=self.settings,
                faithfulness=options.faithfulness,
                compare_top=options.compare_top,
                force=options.force,
                request_id=request_id,
            )
        if created:
            return {"job_id": job_id, "status": JobStatus.QUEUED}, True
        return self.status(job_id), False

    def status(self, job_id: str) -> dict[str, Any]:
        check_job_id_format(job_id)
        try:
            with _queue_errors():
                status = job_status(self.redis, job_id, self.store, self.settings)
        except QueueUnavailable:
            # A finished job's manifest is on disk (written last): it needs no Redis.
            status = finished_from_manifest(self.store, job_id)
            if status is None:
                raise
        if status is None:
            raise JobNotFound(f"no job {job_id} (unknown, or expired after its time to live)")
        manifest = status.get("manifest")
        if manifest:
            for image in manifest.get("images", []):
                image["urls"] = artifact_urls(job_id, image.get("files", {}))
                for compared in image.get("compare", []):  # compare_top: one per class
                    compared["urls"] = artifact_urls(job_id, compared.get("files", {}))
        return {"job_id": job_id, **status}

    def resolve_model(self, value: str | None) -> Bundle:
        """The bundle a request's `model` names (resolve_model), the served one by default."""
        return resolve_model(value, self.bundle)

    def artifact(self, job_id: str, name: str) -> tuple[bytes, str]:
        """(bytes, content type) of one stored file of a job."""
        check_job_id_format(job_id)
        try:
            check_file_name(name)
        except InvalidAddress:
            raise InputError(f"{name!r} is not a valid artifact file name") from None
        if not self.store.exists(job_id, name):
            raise JobNotFound(f"job {job_id} has no file {name!r} (or it has expired)")
        suffix = "." + name.rsplit(".", 1)[-1].lower() if "." in name else ""
        content_type = CONTENT_TYPES.get(suffix) or _INPUT_TYPES.get(suffix)
        return self.store.read(job_id, name), content_type or "application/octet-stream"


@contextmanager
def _queue_errors() -> Iterator[None]:
    """Turn Redis connection trouble into QueueUnavailable (503 at the API edge)."""
    try:
        yield
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
        raise QueueUnavailable(
            "the explanation queue (Redis) is unavailable right now; predictions still "
            "work, explanations will resume when Redis is back — retry in a moment"
        ) from None


def check_job_id_format(job_id: str) -> None:
    if not is_explain_job_id(job_id):
        raise InputError(f"{job_id[:80]!r} is not a job id (expected 'ex-' and 32 hex digits)")


def artifact_urls(job_id: str, files: dict[str, Any]) -> dict[str, str]:
    """{"gradcam.heatmap": "/jobs/<id>/<file>", ...} for every file a manifest entry names."""
    urls: dict[str, str] = {}
    for method, entry in files.items():
        for kind, name in entry.items():
            if isinstance(name, str):
                urls[f"{method}.{kind}"] = f"/jobs/{job_id}/{name}"
    return urls
