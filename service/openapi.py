"""Lantern's OpenAPI description, served at /docs.json in place of BentoML's template.

BentoML serves its own /docs.json (title "lantern", version "None", its badges, generic
error codes) and its routes win over the FastAPI app mounted at /. So the document is
generated here from the FastAPI app itself (`responses=` on each route, tables below),
plus the probe routes BentoML owns (/livez, /readyz, /metrics), the API-key security
schemes and the 401 every protected route can answer; `OpenAPIDocument`, an ASGI
middleware added with `Lantern.add_asgi_middleware`, answers GET /docs.json with it.
Swagger UI at /docs (service/static/docs.html) reads the same document.

Every status code documented for a route is one the code really answers; the error
bodies are all `{"error": "..."}` (ErrorBody). tests/test_openapi.py pins the lists and
tests/test_openapi_fuzz.py fuzzes a real server against the document.
"""

from __future__ import annotations

import copy
import json
from importlib.metadata import version
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field

from lantern.core.jobs import LAYER_METHODS, Method

if TYPE_CHECKING:
    from fastapi import FastAPI
    from fastapi.routing import APIRoute
    from starlette.types import ASGIApp, Receive, Scope, Send

DOCS_PATH = "/docs.json"
TITLE = "Lantern"
ERROR_REF = {"$ref": "#/components/schemas/ErrorBody"}


class ErrorBody(BaseModel):
    error: str = Field(description="What was wrong with the request, and how to fix it.")


def errors(descriptions: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """FastAPI `responses=` for error statuses, each with the `{"error": ...}` body."""
    return {status: {"model": ErrorBody, "description": d} for status, d in descriptions.items()}


# --- the explanation methods, named from lantern.core.jobs.Method so no list can drift ---

METHOD_TITLES: dict[Method, str] = {
    Method.GRADCAM: "Grad-CAM",
    Method.GRADCAM_PP: "Grad-CAM++",
    Method.SALIENCY: "saliency",
    Method.ACTIVATIONS: "activations",
    Method.LAYERCAM: "LayerCAM",
    Method.DEPTH: "feature maps across depth",
}


def method_titles(methods: frozenset[Method] | None = None) -> str:
    """The methods' titles, "Grad-CAM, Grad-CAM++, ... and ...", for `methods` (default every
    one), in Method's order; one without a title here goes by its value
    (tests/test_openapi.py wants a title for each)."""
    titles = [METHOD_TITLES.get(m, m.value) for m in Method if methods is None or m in methods]
    return " and ".join([", ".join(titles[:-1]), titles[-1]] if len(titles) > 1 else titles)


def method_list() -> str:
    """Every value `methods=` takes, with its title where that says more:
    "`gradcam` (Grad-CAM), `gradcam_pp` (Grad-CAM++), `saliency`, ..."."""
    named = ((m.value, METHOD_TITLES.get(m, m.value)) for m in Method)
    return ", ".join(f"`{v}`" if t == v else f"`{v}` ({t})" for v, t in named)


# `layer` is what these read (activations read `activation_layer`, which defaults to it).
LAYER_HELP = (
    f"the layer {method_titles(LAYER_METHODS - {Method.ACTIVATIONS})} read (default layer4)"
)


# --- what each route answers (the route decorators in service.api / service.jobs_api) ---

_UPLOAD_413 = "A file over the size limit, a body over the request limit, or an image over "
_UPLOAD_415 = "Not an image Lantern can read (JPEG, PNG, WebP, BMP, GIF, TIFF), or an "
_UPLOAD_422 = "An empty, truncated or corrupt image, zero width or height, an unsupported "

PREDICT_RESPONSES = errors(
    {
        400: "Empty body, no Content-Type, a missing or text-valued `image` field, more than "
        "one image, malformed multipart data, or a client that disconnected mid-upload",
        413: _UPLOAD_413 + "the pixel limit",
        415: _UPLOAD_415 + "unsupported Content-Type",
        422: _UPLOAD_422 + "colour mode, or a bad `top_k`",
        503: "The model is overloaded (the request waited longer than LANTERN_MAX_LATENCY_MS "
        "for a batch); retry in a moment",
    }
)

PREDICT_BATCH_RESPONSES = errors(
    {
        400: "Empty body, no Content-Type, no `images` field or a text-valued one, malformed "
        "multipart data, or a client that disconnected mid-upload",
        413: _UPLOAD_413 + "the pixel limit, or more images than LANTERN_MAX_BATCH_IMAGES",
        415: _UPLOAD_415 + "unsupported Content-Type (send multipart/form-data)",
        422: _UPLOAD_422 + "colour mode, or a bad `top_k`",
        503: PREDICT_RESPONSES[503]["description"],
    }
)

_JOB_ACCEPTED = {
    "type": "object",
    "required": ["job_id", "status", "status_url", "cached"],
    "properties": {
        "job_id": {"type": "string", "description": "`ex-` and 32 hex digits."},
        "status": {"type": "string", "enum": ["queued", "started", "finished", "failed"]},
        "status_url": {"type": "string", "description": "Poll this for progress and results."},
        "cached": {"type": "boolean", "description": "True when an identical job existed."},
    },
}

_JOB_STATUS = {
    "type": "object",
    "required": ["job_id", "status"],
    "properties": {
        "job_id": {"type": "string"},
        "id": {"type": "string"},
        "status": {"type": "string", "enum": ["queued", "started", "finished", "failed"]},
        "progress": {
            "type": "object",
            "properties": {"done": {"type": "integer"}, "total": {"type": "integer"}},
        },
        "error": {"type": ["string", "null"], "description": "Why the job failed."},
        "manifest": {
            "type": ["object", "null"],
            "description": "When finished: per image, its files and their URLs (`urls`).",
        },
    },
}

EXPLAIN_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "An identical job exists already (and `force` was not set, or it is "
        "still queued or running): its current status (`cached`: true)",
        "content": {"application/json": {"schema": _JOB_ACCEPTED}},
    },
    202: {
        "description": "The job is queued; poll `status_url`",
        "content": {"application/json": {"schema": _JOB_ACCEPTED}},
    },
    **errors(
        {
            400: PREDICT_BATCH_RESPONSES[400]["description"],
            413: _UPLOAD_413 + "the pixel limit, or more images than LANTERN_MAX_IMAGES_PER_JOB",
            415: PREDICT_BATCH_RESPONSES[415]["description"],
            404: "The model store has no such `model` version",
            422: _UPLOAD_422 + "colour mode, or bad methods, targets, layer names, "
            "model tag, or a force / faithfulness that is not true or false",
            503: "The explanation queue (Redis) is unreachable; predictions still work. "
            "Retry after the `Retry-After` seconds",
        }
    ),
}

JOB_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The job's status, progress, readable error, and (when finished) "
        "its manifest with artifact URLs",
        "content": {"application/json": {"schema": _JOB_STATUS}},
    },
    **errors(
        {
            400: "Not a job id (expected `ex-` and 32 hex digits)",
            404: "No such job: never created, or expired after its time to live",
            503: "The explanation queue (Redis) is unreachable and the job has no finished "
            "manifest to answer from; retry after the `Retry-After` seconds",
        }
    ),
}

# GET /model (service.model_api) reads the bundle in memory: it answers 200 (or 401).
MODEL_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "The model served: tag, classes, input size, explainable layers"},
}

# GET /models reads the model store's metadata (lantern.core.bundle.describe_versions).
MODELS_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The version served, and every version in the model store, newest "
        "first: each one `model=` on /explain accepts"
    },
}

_BINARY = {"schema": {"type": "string", "format": "binary"}}
ARTIFACT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The file: a PNG map or overlay (`image/png`), a raw float32 NumPy "
        "array (`.npy`, `application/octet-stream`), or an input image passed by reference "
        "(`inputs/…`, its own image type)",
        "content": {
            "image/png": _BINARY,
            "application/octet-stream": _BINARY,
            "image/jpeg": _BINARY,
            "image/webp": _BINARY,
        },
    },
    **errors(
        {
            400: "Not a job id, or not a valid artifact file name",
            404: "The job has no such file (or it has expired)",
        }
    ),
}

_RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before retrying.",
        "required": True,
        "schema": {"type": "integer", "minimum": 0},
    }
}
# Every 503 carries Retry-After: QueueUnavailable's (service.api._queue_down, 5 s) and
# Overloaded's (service.api._overloaded, 1 s).
for _responses in (EXPLAIN_RESPONSES, JOB_RESPONSES, PREDICT_RESPONSES, PREDICT_BATCH_RESPONSES):
    _responses[503]["headers"] = _RETRY_AFTER

# --- the routes BentoML owns, and the cross-cutting parts ------------------------------

_TEXT = {"text/plain": {"schema": {"type": "string"}}}
PROBE_PATHS: dict[str, dict[str, Any]] = {
    "/livez": {
        "get": {
            "summary": "Liveness probe",
            "operationId": "livez",
            "security": [],
            "responses": {"200": {"description": "The process is up", "content": _TEXT}},
        }
    },
    "/readyz": {
        "get": {
            "summary": "Readiness probe",
            "operationId": "readyz",
            "security": [],
            "responses": {
                "200": {
                    "description": "The model is loaded; predictions are served",
                    "content": _TEXT,
                },
                "503": {"description": "Not ready yet (the model is loading)", "content": _TEXT},
            },
        }
    },
    "/metrics": {
        "get": {
            "summary": "Prometheus metrics",
            "description": "Request counts and latencies, micro-batch sizes and queue waits, "
            "the model's identity, and explanation job counters, in the Prometheus text "
            "format. Open without a key when LANTERN_METRICS_PUBLIC is true.",
            "operationId": "metrics",
            "responses": {"200": {"description": "Prometheus text format", "content": _TEXT}},
        }
    },
}

# When LANTERN_API_KEYS is empty (the default) no route needs a key: the empty alternative.
SECURITY: list[dict[str, list[str]]] = [{"bearerAuth": []}, {"apiKeyHeader": []}, {}]
SECURITY_SCHEMES = {
    "bearerAuth": {
        "type": "http",
        "scheme": "bearer",
        "description": "`Authorization: Bearer <key>`, a key from LANTERN_API_KEYS.",
    },
    "apiKeyHeader": {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
        "description": "`X-API-Key: <key>`, a key from LANTERN_API_KEYS.",
    },
}
UNAUTHORIZED = {
    "description": "LANTERN_API_KEYS is set and the request carries no valid key",
    "content": {"application/json": {"schema": ERROR_REF}},
}

TAGS = [
    {"name": "predictions", "description": "Synchronous classification."},
    {"name": "explanations", "description": f"Asynchronous explanations: {method_titles()}."},
    {"name": "service", "description": "Health, readiness and metrics."},
]
_TAG_OF = {
    "/predict": "predictions",
    "/predict_batch": "predictions",
    "/explain": "explanations",
    "/v1/predict": "predictions",
    "/v1/predict_batch": "predictions",
    "/v1/explain": "explanations",
    "/v1/job_status": "explanations",
}

DESCRIPTION = (
    f"""\
Image classification that shows its reasoning. `POST /predict` (one image) and
`POST /predict_batch` (several) answer the most probable class, the top-k ranking and the
model version, from the registered ONNX model; `GET /model` describes that model (classes,
input size, the layers explanations can use), `GET /models` lists every version in the
model store. `POST /explain` queues an asynchronous explanation job run by the workers,
with any version in the store (`model=`) and the methods (`methods=`)
{method_list()}; poll `GET /jobs/{{job_id}}` for progress and results, and fetch each
artifact (PNG maps and overlays, raw `.npy` arrays) from `GET /jobs/{{job_id}}/{{name}}`.
"""
    + """
**Errors.** Every error answers a JSON body `{"error": "..."}` saying what was wrong and
how to fix it: 4xx for a request Lantern must refuse (each route lists its own), 503 when
the model is overloaded or the explanation queue (Redis) is unreachable. A 500 with the
same body would be a bug in Lantern, never an answer to bad input.

**Authentication.** Off by default. When `LANTERN_API_KEYS` is set (comma-separated keys),
every route except `/livez` and `/readyz` (and `/metrics` when `LANTERN_METRICS_PUBLIC`
is true) needs `Authorization: Bearer <key>` or `X-API-Key: <key>`, and answers 401 with
the error body without one.
"""
)


# --- the BentoML-native door (service.native): the same operations under /v1 -------------

_NATIVE_NOTE = (
    " The same operation as `{twin}`, for BentoML's clients (`bentoml.SyncHTTPClient`, "
    "`bentoml.AsyncHTTPClient`, `bentoml.depends`): parameters are form fields (or JSON), "
    "not query parameters; answers and errors are the same."
)
# No type or bounds in the schema: a form field is text, and it is read after the images,
# so a request that is also over the image limit answers that 413 first.
_TOP_K_FIELD = {
    "default": 5,
    "description": "How many of the most probable classes: an integer from 1 to 1000 "
    "(default 5); anything else is a 422.",
}
_JOB_ID_BODY = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {"job_id": {"type": "string", "description": "`ex-` and 32 hex."}},
                "required": ["job_id"],
            }
        }
    },
}
# /v1 route -> (its FastAPI twin, that twin's method, operationId)
NATIVE_TWINS = {
    "/v1/predict": ("/predict", "post", "v1_predict"),
    "/v1/predict_batch": ("/predict_batch", "post", "v1_predict_batch"),
    "/v1/explain": ("/explain", "post", "v1_explain"),
    "/v1/job_status": ("/jobs/{job_id}", "get", "v1_job_status"),
}


def native_paths(paths: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The /v1 operations, made from their FastAPI twins' documentation (same answers)."""
    native: dict[str, dict[str, Any]] = {}
    for route, (twin, method, op_id) in NATIVE_TWINS.items():
        operation = copy.deepcopy(paths[twin][method])
        operation.pop("parameters", None)
        operation["operationId"] = op_id
        operation["summary"] = operation.get("summary", "") + " (BentoML client)"
        operation["description"] = (
            operation.get("description", "") + _NATIVE_NOTE.format(twin=twin)
        ).strip()
        if twin == "/jobs/{job_id}":
            operation["requestBody"] = copy.deepcopy(_JOB_ID_BODY)
            more = {
                400: "Not a JSON object, no string `job_id`, or not a job id",
                413: "A body over 64 KiB",
                415: "Not application/json",
            }
            for status, description in more.items():
                operation["responses"][str(status)] = {
                    "description": description,
                    "content": {"application/json": {"schema": ERROR_REF}},
                }
        else:
            form = operation["requestBody"]["content"]["multipart/form-data"]["schema"]
            if twin != "/explain":
                form["properties"]["top_k"] = dict(_TOP_K_FIELD)
        native[route] = {"post": operation}
    return native


def operation_id(route: APIRoute) -> str:
    """The app's `generate_unique_id_function`: operationId is the route function's name."""
    return route.name


def package_version() -> str:
    return version("lantern")


def build_document(app: FastAPI) -> dict[str, Any]:
    """The OpenAPI 3.1 document for the FastAPI `app` plus BentoML's probe routes."""
    from fastapi.openapi.utils import get_openapi

    doc = get_openapi(
        title=TITLE,
        version=package_version(),
        summary="Image classification that shows its reasoning.",
        description=DESCRIPTION,
        routes=app.routes,
        tags=TAGS,
    )
    paths: dict[str, dict[str, Any]] = doc["paths"]
    paths.update(copy.deepcopy(PROBE_PATHS))
    paths.update(native_paths(paths))
    for path, item in paths.items():
        for operation in item.values():
            responses = operation["responses"]
            # FastAPI adds its own 422 (HTTPValidationError) to routes with parameters; Lantern
            # answers those with ErrorBody, and routes that can answer 422 declare it.
            if "HTTPValidationError" in json.dumps(responses.get("422", {})):
                del responses["422"]
            if operation.get("security") != []:
                responses.setdefault("401", copy.deepcopy(UNAUTHORIZED))
            operation["responses"] = dict(sorted(responses.items()))
            operation.setdefault(
                "tags", [_TAG_OF.get(path, "explanations" if "/jobs" in path else "service")]
            )
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    schemas.setdefault("ErrorBody", ErrorBody.model_json_schema())
    doc["components"]["securitySchemes"] = copy.deepcopy(SECURITY_SCHEMES)
    doc["security"] = copy.deepcopy(SECURITY)
    doc["paths"] = dict(sorted(paths.items()))
    return doc


class OpenAPIDocument:
    """ASGI middleware: GET/HEAD /docs.json answers Lantern's document (built once)."""

    def __init__(self, app: ASGIApp, fastapi_app: FastAPI) -> None:
        self.app = app
        self.fastapi_app = fastapi_app
        self._body: bytes | None = None

    def body(self) -> bytes:
        if self._body is None:
            self._body = json.dumps(build_document(self.fastapi_app)).encode()
        return self._body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["path"] != DOCS_PATH
            or scope["method"] not in ("GET", "HEAD")
        ):
            await self.app(scope, receive, send)
            return
        from starlette.responses import Response

        response = Response(self.body(), media_type="application/json")
        await response(scope, receive, send)
