"""The HTTP routes of the Lantern API, and the only place errors become HTTP responses.

A FastAPI app mounted into the `Lantern` BentoML service (see `service.service`): BentoML
keeps /livez, /readyz, /metrics and the OpenAPI docs (which include these routes); this
app owns request parsing, so every bad upload gets a 4xx with a JSON body
`{"error": "..."}` a person can act on, instead of BentoML's 500 or list-shaped bodies.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from lantern.core.errors import InputError, JobNotFound, QueueUnavailable
from service.batcher import Overloaded
from service.dependencies import CurrentService
from service.jobs_api import router as jobs_router
from service.model_api import router as model_router
from service.openapi import PREDICT_BATCH_RESPONSES, PREDICT_RESPONSES, operation_id
from service.pages import router as pages_router
from service.status_api import router as status_router
from service.uploads import read_uploads

log = logging.getLogger("lantern.service")

MAX_TOP_K = 1000


class ClassScore(BaseModel):
    label: str = Field(description="Class name.")
    class_index: int = Field(description="Index of the class in the model's output.")
    probability: float = Field(description="Softmax probability.")


class Prediction(ClassScore):
    """The most probable class, then the top-k ranking, the model version that answered and
    the precision of the graph it ran."""

    top_k: list[ClassScore] = Field(description="The k most probable classes, best first.")
    model_version: str = Field(description="Version of the model that answered.")
    precision: Literal["fp32", "int8", "fp16"] = Field(
        description="Which graph of that model version answered: fp32, int8 (statically "
        "quantised, checked against fp32 at export) or fp16 (LANTERN_PRECISION)."
    )


class BatchPrediction(BaseModel):
    predictions: list[Prediction] = Field(description="One prediction per image, in order.")


def _upload_body(field: str, many: bool) -> dict[str, Any]:
    """OpenAPI requestBody for multipart uploads (the route parses the body itself)."""
    file_schema: dict[str, Any] = {"type": "string", "format": "binary"}
    schema = {"type": "array", "items": file_schema} if many else file_schema
    content: dict[str, Any] = {
        "multipart/form-data": {
            "schema": {"type": "object", "properties": {field: schema}, "required": [field]}
        }
    }
    if not many:
        content["image/*"] = {"schema": file_schema}
    return {"requestBody": {"required": True, "content": content}}


app = FastAPI(
    title="Lantern",
    summary="Image classification from the registered ONNX model.",
    # /docs.json is service.openapi's document (built from these routes), served by its
    # middleware in place of BentoML's; /docs is Swagger UI for it (service.pages).
    docs_url=None,
    redoc_url=None,
    openapi_url=None,
    generate_unique_id_function=operation_id,
)


TopK = Query(5, ge=1, le=MAX_TOP_K, description="How many of the most probable classes.")


@app.post(
    "/predict",
    response_model=Prediction,
    responses=PREDICT_RESPONSES,
    openapi_extra=_upload_body("image", many=False),
    summary="Classify one image",
)
async def predict(request: Request, lantern: CurrentService, top_k: int = TopK) -> dict[str, Any]:
    """One image (JPEG, PNG, WebP, BMP, GIF, TIFF) as file field `image`, or as the raw body."""
    settings = lantern.settings
    uploads = await read_uploads(
        request,
        field="image",
        max_files=1,
        max_file_bytes=settings.max_upload_bytes,
        max_body_bytes=settings.max_upload_bytes + 64 * 1024,  # room for the form framing
        allow_raw=True,
    )
    return (await lantern.predict_uploads(uploads, top_k))[0]


@app.post(
    "/predict_batch",
    response_model=BatchPrediction,
    responses=PREDICT_BATCH_RESPONSES,
    openapi_extra=_upload_body("images", many=True),
    summary="Classify several images",
)
async def predict_batch(
    request: Request, lantern: CurrentService, top_k: int = TopK
) -> dict[str, Any]:
    """Several images as repeated file field `images`; one prediction per image, in order."""
    settings = lantern.settings
    uploads = await read_uploads(
        request,
        field="images",
        max_files=settings.max_batch_images,
        max_file_bytes=settings.max_upload_bytes,
        max_body_bytes=settings.max_batch_bytes,
    )
    return {"predictions": await lantern.predict_uploads(uploads, top_k)}


app.include_router(jobs_router)
app.include_router(status_router)
app.include_router(model_router)
app.include_router(pages_router)


@app.exception_handler(JobNotFound)
async def _not_found(_: Request, exc: JobNotFound) -> JSONResponse:
    return JSONResponse({"error": str(exc)}, status_code=404)


@app.exception_handler(QueueUnavailable)
async def _queue_down(_: Request, exc: QueueUnavailable) -> JSONResponse:
    return JSONResponse({"error": str(exc)}, status_code=503, headers={"Retry-After": "5"})


@app.exception_handler(InputError)
async def _input_error(_: Request, exc: InputError) -> JSONResponse:
    return JSONResponse({"error": str(exc)}, status_code=exc.status_code)


@app.exception_handler(RequestValidationError)
async def _invalid_parameter(_: Request, exc: RequestValidationError) -> JSONResponse:
    problems = [
        f"{'.'.join(str(p) for p in e['loc'] if p != 'query')}: {e['msg']}" for e in exc.errors()
    ]
    return JSONResponse({"error": "invalid parameter " + "; ".join(problems)}, status_code=422)


@app.exception_handler(Overloaded)
async def _overloaded(_: Request, exc: Overloaded) -> JSONResponse:
    """The request waited too long for the model (LANTERN_MAX_LATENCY_MS), or shutdown."""
    return JSONResponse(
        {"error": "the model is overloaded right now; retry in a moment"},
        status_code=503,
        headers={"Retry-After": "1"},  # lantern.client waits this long, then retries
    )


@app.exception_handler(Exception)
async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    # A bug, not bad input (Starlette logs the traceback after this response is sent).
    return JSONResponse(
        {"error": "internal error while answering the request; see the server log"},
        status_code=500,
    )
