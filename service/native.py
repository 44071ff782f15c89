"""The BentoML-native door: what the `@bentoml.api` methods of `Lantern` do.

    POST /v1/predict         image (file), top_k            -> a prediction
    POST /v1/predict_batch   images (files), top_k          -> {"predictions": [...]}
    POST /v1/explain         images (files), explain options -> 202/200 {job_id, ...}
    POST /v1/job_status      {"job_id": "..."}              -> the job's status

so that `bentoml.SyncHTTPClient(url).predict(image=Path("cat.jpg"))`, its async twin and
`bentoml.depends(url=...)` (or `bentoml.depends(Lantern)`) work. These are the same
operations as the FastAPI routes (`/predict`, ...), run by the same functions
(service.handlers) with the same limits, micro-batcher and error bodies.

Why `/v1/...` and not `/predict`: BentoML 1.4 puts the routes of `@bentoml.api` methods in
front of mounted ASGI apps (`_bentoml_impl.server.app`: the app's routes first, then
`PassiveMount` for each `@bentoml.asgi_app`; Starlette takes the first full match), so a
method at `/predict` would take POST /predict away from the FastAPI route that the web
page and lantern.client use (its raw-body uploads, `?top_k=`, its error bodies).

How a request is read: BentoML's own parsing (its multipart serde) reads the whole body
before any limit applies, fetches a URL sent in a file field, and answers malformed bodies
with a 500 (bentoml 1.4.40). So `LanternInput.from_http_request` reads nothing: the method
reads `ctx.request` itself with service.uploads, like the FastAPI routes, and every bad
request is Lantern's 4xx `{"error": "..."}` (which the BentoML client raises as a
BentoMLException subclass carrying that body). Text fields arrive as BentoML's client
sends them (JSON-encoded: `"5"`, `"\\"gradcam\\""`) or as plain text (curl).

A call from a service of the same Bento (`bentoml.depends(Lantern)` within one
`bentoml serve`) comes pickled, with real Python arguments (`Path`s): those go through
the same operations after the same per-image limits.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import bentoml
from fastapi.responses import JSONResponse
from pydantic import Field
from starlette.responses import Response

from lantern.core.errors import InputError, PayloadTooLarge
from service import handlers
from service.openapi import LAYER_HELP
from service.uploads import Upload, read_json_object

if TYPE_CHECKING:
    from starlette.requests import Request

    from service.dependencies import PredictionService

log = logging.getLogger("lantern.service")

PREFIX = "/v1"
ROUTES = {
    "predict": f"{PREFIX}/predict",
    "predict_batch": f"{PREFIX}/predict_batch",
    "explain": f"{PREFIX}/explain",
    "job_status": f"{PREFIX}/job_status",
}
PICKLE = "application/vnd.bentoml+pickle"  # BentoML's own service-to-service format
MAX_JSON_BYTES = 64 * 1024


class LanternInput(bentoml.IODescriptor):
    """An input model whose HTTP request the method reads itself (see the module doc).

    For HTTP, every field is None here and the method reads `ctx.request`; a pickled call
    from another service of the same Bento is parsed by BentoML as usual.
    """

    @classmethod
    async def from_http_request(cls, request: Request, serde: Any) -> Any:
        # Spelled exactly as BentoML tests it (case and all), so that this is a pickled
        # call just when BentoML chose its pickle serde for it, which its main server
        # refuses before this runs (415): only a service of the same Bento, on BentoML's
        # internal port, is unpickled. Any other spelling is read by service.uploads.
        media_type = request.headers.get("content-type", "").split(";", 1)[0].strip()
        if media_type == PICKLE:
            return await super().from_http_request(request, serde)
        return cls.model_construct(**dict.fromkeys(cls.model_fields))


_TOP_K = Field(
    handlers.DEFAULT_TOP_K,
    ge=1,
    le=handlers.MAX_TOP_K,
    description="How many of the most probable classes.",
)


class PredictInput(LanternInput):
    image: Path = Field(description="One image: JPEG, PNG, WebP, BMP, GIF or TIFF.")
    top_k: int = _TOP_K


class PredictBatchInput(LanternInput):
    images: list[Path] = Field(description="The images; one prediction each, in order.")
    top_k: int = _TOP_K


class ExplainInput(LanternInput):
    images: list[Path] = Field(description="The images to explain.")
    methods: str | None = Field(None, description="Comma-separated methods (default gradcam).")
    targets: str | None = Field(None, description="Comma-separated class per image.")
    layer: str | None = Field(None, description=LAYER_HELP[0].upper() + LAYER_HELP[1:] + ".")
    activation_layer: str | None = Field(None, description="Layer shown by activations.")
    model: str | None = Field(None, description="Model version (default: the one served).")
    force: bool = Field(False, description="Recompute an identical finished job.")
    faithfulness: bool = Field(False, description="Score each map with deletion/insertion.")
    compare_top: int | None = Field(
        None, description="2..5: also the maps of each image's k most probable classes."
    )


class JobStatusInput(LanternInput):
    job_id: str = Field(description="The job id /v1/explain answered: `ex-` and 32 hex digits.")


# --- the methods' bodies ------------------------------------------------------------------


async def predict(
    lantern: PredictionService, ctx: bentoml.Context, image: Path | None, top_k: int | None
) -> Any:
    async def run() -> tuple[Any, int]:
        if image is None:
            fields: dict[str, str] = {}
            uploads = await handlers.read_predict_upload(ctx.request, lantern.settings, fields)
            k = handlers.check_top_k(_text(fields.get("top_k")))
        else:
            uploads = _from_paths("image", [image], 1, lantern.settings.max_upload_bytes)
            k = handlers.check_top_k(top_k)
        return await handlers.predict_one(lantern, uploads, k), 200

    return await _answer(ctx, run)


async def predict_batch(
    lantern: PredictionService,
    ctx: bentoml.Context,
    images: list[Path] | None,
    top_k: int | None,
) -> Any:
    async def run() -> tuple[Any, int]:
        settings = lantern.settings
        if images is None:
            fields: dict[str, str] = {}
            uploads = await handlers.read_batch_uploads(ctx.request, settings, fields)
            k = handlers.check_top_k(_text(fields.get("top_k")))
        else:
            uploads = _from_paths(
                "images", images, settings.max_batch_images, settings.max_upload_bytes
            )
            k = handlers.check_top_k(top_k)
        return await handlers.predict_many(lantern, uploads, k), 200

    return await _answer(ctx, run)


async def explain(
    lantern: PredictionService,
    ctx: bentoml.Context,
    images: list[Path] | None,
    options: dict[str, Any],
) -> Any:
    async def run() -> tuple[Any, int]:
        settings = lantern.settings
        if images is None:
            fields: dict[str, str] = {}
            uploads = await handlers.read_explain_uploads(ctx.request, settings, fields)
            params = {
                name: text
                for name in handlers.EXPLAIN_OPTIONS
                if (text := _text(fields.get(name))) is not None
            }
        else:
            uploads = _from_paths(
                "images", images, settings.max_images_per_job, settings.max_upload_bytes
            )
            params = {k: _text(v) for k, v in options.items() if v is not None}  # type: ignore[misc]
        return await handlers.submit_explanation(lantern, uploads, params)

    return await _answer(ctx, run)


async def job_status(lantern: PredictionService, ctx: bentoml.Context, job_id: str | None) -> Any:
    async def run() -> tuple[Any, int]:
        value: object = job_id
        if job_id is None:
            body = await read_json_object(ctx.request, max_body_bytes=MAX_JSON_BYTES)
            value = body.get("job_id")
        if not isinstance(value, str):
            raise InputError('send {"job_id": "ex-..."}: the job id /v1/explain answered')
        return await handlers.job_status(lantern, value), 200

    return await _answer(ctx, run)


async def _answer(ctx: bentoml.Context, run: Callable[[], Awaitable[tuple[Any, int]]]) -> Any:
    """Run an operation; its body with its status, or the error response of what it raised.

    BentoML sets the response's status from `ctx.response.status_code` after the method
    returns, so both answers set it there too.
    """
    try:
        body, status = await run()
    except Exception as e:
        if not handlers.is_expected(e):
            log.exception("internal error in a BentoML API method")
        response: Response = handlers.error_response(e)
    else:
        response = JSONResponse(body, status_code=status)
    ctx.response.status_code = response.status_code
    return response


def _text(value: object) -> str | None:
    """A text field as the explain options and top_k parsers take it: BentoML's client
    JSON-encodes every non-file field (`"5"`, `"\\"gradcam\\""`, `"true"`); curl sends
    plain text. None for a missing or null field."""
    if value is None:
        return None
    if isinstance(value, bool):
        return str(value).lower()
    if not isinstance(value, str):
        return str(value)
    try:
        decoded = json.loads(value)
    except ValueError:
        return value
    if decoded is None:
        return None
    if isinstance(decoded, bool):
        return str(decoded).lower()
    if isinstance(decoded, (str, int, float)):
        return str(decoded)
    return value


def _from_paths(field: str, paths: list[Path], max_files: int, max_file_bytes: int) -> list[Upload]:
    """Uploads from the files of a pickled call, with the HTTP door's per-image limits."""
    if not paths:
        raise InputError(f"no images in {field!r}")
    if len(paths) > max_files:
        if max_files == 1:
            raise InputError(f"send one image in {field!r}; use predict_batch for several")
        raise PayloadTooLarge(f"too many files in one request; the limit is {max_files}")
    uploads = []
    for i, path in enumerate(paths):
        label = f"{field}[{i}]" if len(paths) > 1 else field
        name = f"{label} ({path.name})"
        size = path.stat().st_size
        if size > max_file_bytes:
            raise PayloadTooLarge(
                f"{name} is {size:,} bytes; the limit is {max_file_bytes:,} bytes per image"
            )
        uploads.append(Upload(name=name, data=path.read_bytes(), filename=path.name))
    return uploads
