"""What each API operation does, once, for both of the service's doors.

Lantern answers on two doors: the FastAPI routes (`/predict`, `/predict_batch`, `/explain`,
`/jobs/{id}`: service.api, service.jobs_api; the web page and lantern.client use them) and
the BentoML-native `@bentoml.api` methods of the `Lantern` service (`/v1/predict`, ...:
service.native; `bentoml.SyncHTTPClient` and `bentoml.depends` use them). Both read uploads
with the same limits (service.uploads), run the same operation and turn errors into the
same `{"error": "..."}` responses with the functions here; a door only says where its
parameters come from (query string or form fields).
"""

from __future__ import annotations

import logging
from typing import Any

import anyio
from fastapi.responses import JSONResponse
from starlette.requests import Request

from lantern.core.errors import InputError, JobNotFound, QueueUnavailable
from lantern.core.logs import current_request_id
from service.batcher import Overloaded
from service.dependencies import PredictionService
from service.explanations import ExplainOptions, parse_options
from service.uploads import Upload, read_uploads

log = logging.getLogger("lantern.service")

MAX_TOP_K = 1000
DEFAULT_TOP_K = 5
# The /explain options, as query parameters or text fields (service.explanations).
EXPLAIN_OPTIONS = (
    "methods",
    "targets",
    "layer",
    "activation_layer",
    "model",
    "force",
    "faithfulness",
    "compare_top",
)
EXPLAIN_FLAGS = ("force", "faithfulness")


# --- reading the uploads of each operation -----------------------------------------------


async def read_predict_upload(
    request: Request, settings: Any, fields: dict[str, str] | None = None
) -> list[Upload]:
    """The one image of a predict request: file field `image`, or the raw body."""
    return await read_uploads(
        request,
        field="image",
        max_files=1,
        max_file_bytes=settings.max_upload_bytes,
        max_body_bytes=settings.max_upload_bytes + 64 * 1024,  # room for the form framing
        allow_raw=True,
        fields=fields,
    )


async def read_batch_uploads(
    request: Request, settings: Any, fields: dict[str, str] | None = None
) -> list[Upload]:
    """The images of a batch predict request: repeated file field `images`."""
    return await read_uploads(
        request,
        field="images",
        max_files=settings.max_batch_images,
        max_file_bytes=settings.max_upload_bytes,
        max_body_bytes=settings.max_batch_bytes,
        fields=fields,
    )


async def read_explain_uploads(
    request: Request, settings: Any, fields: dict[str, str] | None = None
) -> list[Upload]:
    """The images of an explain request (repeated file field `images`), its text fields
    copied into `fields`."""
    return await read_uploads(
        request,
        field="images",
        max_files=settings.max_images_per_job,
        max_file_bytes=settings.max_upload_bytes,
        max_body_bytes=settings.max_batch_bytes,
        fields=fields,
    )


# --- the operations ----------------------------------------------------------------------


async def predict_one(
    lantern: PredictionService, uploads: list[Upload], top_k: int
) -> dict[str, Any]:
    """POST /predict: the prediction for the one upload."""
    return (await lantern.predict_uploads(uploads, top_k))[0]


async def predict_many(
    lantern: PredictionService, uploads: list[Upload], top_k: int
) -> dict[str, Any]:
    """POST /predict_batch: one prediction per upload, in order."""
    return {"predictions": await lantern.predict_uploads(uploads, top_k)}


async def submit_explanation(
    lantern: PredictionService, uploads: list[Upload], params: dict[str, str]
) -> tuple[dict[str, Any], int]:
    """POST /explain: (body, 202) for a new job, (body, 200) for an identical existing one.

    `params` are the explain options as text (EXPLAIN_OPTIONS). Everything is checked
    before anything is queued: the options against the model they name, and every image
    as /predict decodes it, so a bad request is a 4xx now, not a failed job later.
    """
    explanations = lantern.explanations
    bundle = await explanations.in_thread(explanations.resolve_model, params.get("model"))
    options: ExplainOptions = parse_options(params, len(uploads), bundle.class_names, bundle)
    await anyio.to_thread.run_sync(lambda: [lantern.decode(u) for u in uploads])
    images = [(u.filename, u.data) for u in uploads]
    request_id = current_request_id()  # set by service.gateway.RequestIdMiddleware
    status, created = await explanations.in_thread(explanations.submit, images, options, request_id)
    job_id = status["job_id"]
    if created:
        log.info("queued job %s: %d image(s)", job_id, len(images), extra={"job_id": job_id})
    else:
        log.info("found job %s (%s)", job_id, status.get("status"), extra={"job_id": job_id})
    body = {**status, "status_url": f"/jobs/{job_id}", "cached": not created}
    return body, 202 if created else 200


async def job_status(lantern: PredictionService, job_id: str) -> dict[str, Any]:
    """GET /jobs/{job_id}: status, progress, readable error, manifest with artifact URLs."""
    return await lantern.explanations.in_thread(lantern.explanations.status, job_id)


def check_top_k(value: object) -> int:
    """top_k sent as a form field: an integer in 1..MAX_TOP_K (422 otherwise), as the
    FastAPI routes' `Query(ge=1, le=MAX_TOP_K)` checks it in the query string."""
    if value is None or value == "":
        return DEFAULT_TOP_K
    try:
        k = int(str(value).strip())
    except ValueError:
        raise _bad_top_k(f"Input should be a valid integer, not {str(value)[:40]!r}") from None
    if not 1 <= k <= MAX_TOP_K:
        raise _bad_top_k(f"Input should be between 1 and {MAX_TOP_K}")
    return k


def _bad_top_k(problem: str) -> InputError:
    from lantern.core.errors import UnprocessableInput

    return UnprocessableInput(f"invalid parameter top_k: {problem}")


# --- errors ------------------------------------------------------------------------------

OVERLOADED = "the model is overloaded right now; retry in a moment"
INTERNAL = "internal error while answering the request; see the server log"


def error_response(exc: BaseException) -> JSONResponse:
    """The HTTP answer to an error raised while answering a request, on either door."""
    if isinstance(exc, JobNotFound):
        return JSONResponse({"error": str(exc)}, status_code=404)
    if isinstance(exc, QueueUnavailable):
        return JSONResponse({"error": str(exc)}, status_code=503, headers={"Retry-After": "5"})
    if isinstance(exc, InputError):
        return JSONResponse({"error": str(exc)}, status_code=exc.status_code)
    if isinstance(exc, Overloaded):
        # The request waited too long for the model (LANTERN_MAX_LATENCY_MS), or shutdown.
        # lantern.client waits Retry-After, then retries.
        return JSONResponse({"error": OVERLOADED}, status_code=503, headers={"Retry-After": "1"})
    # A bug, not bad input.
    return JSONResponse({"error": INTERNAL}, status_code=500)


def is_expected(exc: BaseException) -> bool:
    """Whether `exc` is an answer (4xx, 503) rather than a bug worth a traceback."""
    return isinstance(exc, (JobNotFound, QueueUnavailable, InputError, Overloaded))
