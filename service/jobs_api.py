"""HTTP routes for asynchronous explanations and the web page.

POST /explain              images + methods/targets/layer -> 202 {job_id, status_url}
                           (200 with the job's status when an identical job exists)
GET  /jobs/{id}            status, progress, readable error, manifest with artifact URLs
GET  /jobs/{id}/{file}     one artifact (PNG or .npy)
GET  /                     the web page (service/static/index.html)
GET  /static/{file}        its script and style sheet
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response

from lantern.errors import JobNotFound, QueueUnavailable
from service.explanations import ExplainOptions, parse_options
from service.openapi import ARTIFACT_RESPONSES, EXPLAIN_RESPONSES, JOB_RESPONSES
from service.uploads import read_uploads

STATIC_DIR = Path(__file__).parent / "static"
STATIC_TYPES = {
    ".html": "text/html",
    ".js": "text/javascript",
    ".css": "text/css",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
}

router = APIRouter()


def _service() -> Any:
    import bentoml

    return bentoml.get_current_service()


_OPTIONS_DOC = (
    "Parameters may also be sent as form fields. methods: comma-separated gradcam, "
    "gradcam_pp, saliency, activations. targets: one class index (or name) per image, "
    "comma-separated; an empty entry means the image's own top class. layer: the module "
    "for Grad-CAM (default layer4); activation_layer: the module whose feature maps are shown."
)


@router.post(
    "/explain",
    status_code=202,
    responses=EXPLAIN_RESPONSES,
    summary="Explain images (asynchronous job)",
    description=_OPTIONS_DOC,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "images": {
                                "type": "array",
                                "items": {"type": "string", "format": "binary"},
                            },
                            # The same options as the query parameters, as text fields.
                            **{
                                name: {"type": "string"}
                                for name in ("methods", "targets", "layer", "activation_layer")
                            },
                        },
                        "required": ["images"],
                    }
                }
            },
        }
    },
)
async def explain(
    request: Request,
    methods: str | None = Query(None, description="comma-separated methods (default gradcam)"),
    targets: str | None = Query(None, description="comma-separated class per image"),
    layer: str | None = Query(None, description="Grad-CAM layer (default layer4)"),
    activation_layer: str | None = Query(None, description="layer shown by activations"),
) -> Response:
    lantern = _service()
    settings = lantern.settings
    form: dict[str, str] = {}
    uploads = await read_uploads(
        request,
        field="images",
        max_files=settings.max_images_per_job,
        max_file_bytes=settings.max_upload_bytes,
        max_body_bytes=settings.max_batch_bytes,
        fields=form,
    )
    query = {
        "methods": methods,
        "targets": targets,
        "layer": layer,
        "activation_layer": activation_layer,
    }
    params = {**form, **{k: v for k, v in query.items() if v is not None}}
    options: ExplainOptions = parse_options(params, len(uploads), lantern.class_names)
    # The same checks as /predict, before anything is queued: a bad image is a 4xx now,
    # not a failed job later.
    await anyio.to_thread.run_sync(lambda: [lantern.decode(u) for u in uploads])
    images = [(u.filename, u.data) for u in uploads]
    status, created = await anyio.to_thread.run_sync(lantern.explanations.submit, images, options)
    job_id = status["job_id"]
    body = {**status, "status_url": f"/jobs/{job_id}", "cached": not created}
    return JSONResponse(body, status_code=202 if created else 200)


@router.get(
    "/jobs/{job_id}",
    responses=JOB_RESPONSES,
    summary="Status, progress and results of an explanation job",
)
async def job(job_id: str) -> dict[str, Any]:
    return await anyio.to_thread.run_sync(_service().explanations.status, job_id)


@router.get(
    "/jobs/{job_id}/{name:path}",
    responses=ARTIFACT_RESPONSES,
    response_class=Response,
    summary="One artifact of a finished job",
)
async def artifact(job_id: str, name: str) -> Response:
    data, content_type = await anyio.to_thread.run_sync(
        _service().explanations.artifact, job_id, name
    )
    return Response(
        data,
        media_type=content_type,
        headers={
            "Cache-Control": "private, max-age=3600",
            "Content-Disposition": f'inline; filename="{name.rsplit("/", 1)[-1]}"',
        },
    )


@router.get("/", include_in_schema=False)
async def page() -> Response:
    return _static("index.html")


@router.get("/docs", include_in_schema=False)
async def docs() -> Response:
    """Swagger UI for /docs.json (BentoML's own UI lived at /, where the page is now)."""
    return _static("docs.html")


@router.get("/static/{name}", include_in_schema=False)
async def static(name: str) -> Response:
    return _static(name)


def _static(name: str) -> Response:
    path = (STATIC_DIR / name).resolve()
    if path.parent != STATIC_DIR.resolve() or not path.is_file():
        raise JobNotFound(f"no such file {name!r}")
    return FileResponse(path, media_type=STATIC_TYPES.get(path.suffix, "application/octet-stream"))


def register_error_handlers(app: Any) -> None:
    """404 for unknown jobs and files, 503 while Redis is unreachable."""

    @app.exception_handler(JobNotFound)
    async def _not_found(_: Request, exc: JobNotFound) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=404)

    @app.exception_handler(QueueUnavailable)
    async def _queue_down(_: Request, exc: QueueUnavailable) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=503, headers={"Retry-After": "5"})
