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
from service import handlers
from service.batcher import Overloaded
from service.dependencies import CurrentService
from service.handlers import DEFAULT_TOP_K, MAX_TOP_K
from service.jobs_api import router as jobs_router
from service.model_api import router as model_router
from service.openapi import PREDICT_BATCH_RESPONSES, PREDICT_RESPONSES, operation_id
from service.pages import router as pages_router
from service.status_api import router as status_router

log = logging.getLogger("lantern.service")


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
    demo: str | None = Field(
        default=None,
        description="Set when the model that answered is Lantern's offline demo: one line "
        "saying what it knows (any image gets one of its classes); null for a real model.",
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


TopK = Query(
    DEFAULT_TOP_K, ge=1, le=MAX_TOP_K, description="How many of the most probable classes."
)


@app.post(
    "/predict",
    response_model=Prediction,
    responses=PREDICT_RESPONSES,
    openapi_extra=_upload_body("image", many=False),
    summary="Classify one image",
)
async def predict(request: Request, lantern: CurrentService, top_k: int = TopK) -> dict[str, Any]:
    """One image (JPEG, PNG, WebP, BMP, GIF, TIFF) as file field `image`, or as the raw body."""
    uploads = await handlers.read_predict_upload(request, lantern.settings)
    return await handlers.predict_one(lantern, uploads, top_k)


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
    uploads = await handlers.read_batch_uploads(request, lantern.settings)
    return await handlers.predict_many(lantern, uploads, top_k)


app.include_router(jobs_router)
app.include_router(status_router)
app.include_router(model_router)
app.include_router(pages_router)


# Lantern's errors become HTTP answers in one place for both doors (service.handlers).
@app.exception_handler(JobNotFound)
@app.exception_handler(QueueUnavailable)
@app.exception_handler(InputError)
@app.exception_handler(Overloaded)
async def _lantern_error(_: Request, exc: Exception) -> JSONResponse:
    return handlers.error_response(exc)


@app.exception_handler(RequestValidationError)
async def _invalid_parameter(_: Request, exc: RequestValidationError) -> JSONResponse:
    problems = [
        f"{'.'.join(str(p) for p in e['loc'] if p != 'query')}: {e['msg']}" for e in exc.errors()
    ]
    return JSONResponse({"error": "invalid parameter " + "; ".join(problems)}, status_code=422)


@app.exception_handler(Exception)
async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    # A bug, not bad input (Starlette logs the traceback after this response is sent).
    return handlers.error_response(exc)
