"""The OpenAPI document at /docs.json: Lantern's own, truthful about every route's answers.

The expected status codes are derived from the code that raises them (lantern.core.errors and
the exception handlers), not copied from service.openapi; the fuzzer in
tests/test_openapi_fuzz.py checks the same document against a real server.
"""

from __future__ import annotations

import asyncio
import json
from importlib.metadata import version
from typing import Any

import httpx
import pytest

from lantern.core.errors import (
    InputError,
    PayloadTooLarge,
    UnknownModel,
    UnprocessableInput,
    UnsupportedMediaType,
)
from lantern.core.jobs import LAYER_METHODS, Method
from service.api import app
from service.openapi import DOCS_PATH, METHOD_TITLES, OpenAPIDocument, build_document

OVERLOADED = 503  # service.api._overloaded (the micro-batcher's queue wait)
QUEUE_DOWN = 503  # service.api._queue_down (QueueUnavailable)
NOT_FOUND = 404  # service.api._not_found (JobNotFound)
UNAUTHORIZED = 401  # service.gateway.ApiKeyMiddleware, when LANTERN_API_KEYS is set
BAD_PARAMETER = 422  # service.api._invalid_parameter (RequestValidationError)
# What reading an upload and decoding the image raise (service.uploads, lantern.core.images).
UPLOAD_ERRORS = {
    InputError.status_code,  # empty body, missing field, malformed multipart
    PayloadTooLarge.status_code,
    UnsupportedMediaType.status_code,
    UnprocessableInput.status_code,  # corrupt or zero-sized image
}

EXPECTED: dict[tuple[str, str], set[int]] = {
    ("post", "/predict"): {200, UNAUTHORIZED, BAD_PARAMETER, OVERLOADED, *UPLOAD_ERRORS},
    ("post", "/predict_batch"): {200, UNAUTHORIZED, BAD_PARAMETER, OVERLOADED, *UPLOAD_ERRORS},
    # 202 queued, 200 an identical job exists; parse_options raises UnprocessableInput,
    # resolve_model UnknownModel for a version the store lacks.
    ("post", "/explain"): {
        200,
        202,
        UNAUTHORIZED,
        QUEUE_DOWN,
        UnknownModel.status_code,
        *UPLOAD_ERRORS,
    },
    # check_job_id_format raises InputError; no such job is JobNotFound.
    ("get", "/jobs/{job_id}"): {200, InputError.status_code, NOT_FOUND, QUEUE_DOWN, 401},
    # the artifact store is files, not Redis: no 503.
    ("get", "/jobs/{job_id}/{name}"): {200, InputError.status_code, NOT_FOUND, UNAUTHORIZED},
    ("get", "/status"): {200, UNAUTHORIZED},
    ("get", "/model"): {200, UNAUTHORIZED},  # the bundle in memory: nothing else can fail
    ("get", "/models"): {200, UNAUTHORIZED},  # the model store's meta files: no parameters
    ("get", "/metrics"): {200, UNAUTHORIZED},
    ("get", "/livez"): {200},
    ("get", "/readyz"): {200, 503},  # BentoML: 503 until __is_ready__ is true
    # The BentoML-native door (service.native): the same operations and answers; top_k is
    # checked by service.handlers.check_top_k (422), the job id comes as a JSON body
    # (service.uploads.read_json_object: 400, 413, 415).
    ("post", "/v1/predict"): {200, UNAUTHORIZED, BAD_PARAMETER, OVERLOADED, *UPLOAD_ERRORS},
    ("post", "/v1/predict_batch"): {200, UNAUTHORIZED, BAD_PARAMETER, OVERLOADED, *UPLOAD_ERRORS},
    ("post", "/v1/explain"): {
        200,
        202,
        UNAUTHORIZED,
        QUEUE_DOWN,
        UnknownModel.status_code,
        *UPLOAD_ERRORS,
    },
    ("post", "/v1/job_status"): {200, NOT_FOUND, QUEUE_DOWN, UNAUTHORIZED, 400, 413, 415},
}


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return build_document(app)


def operations(doc: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(m, p): op for p, item in doc["paths"].items() for m, op in item.items()}


def test_info_is_lanterns_own(doc: dict[str, Any]) -> None:
    info = doc["info"]
    assert info["title"] == "Lantern"
    assert info["version"] == version("lantern") != "None"
    description = info["description"]
    for needle in ("/predict", "/explain", '{"error": "..."}', "LANTERN_API_KEYS", "401"):
        assert needle in description
    # No BentoML template, badges or contact (only the /v1 operations name BentoML's clients).
    lantern_own = {**doc, "paths": {p: v for p, v in doc["paths"].items() if p[:4] != "/v1/"}}
    assert "bentoml" not in json.dumps(lantern_own).lower()
    assert doc["openapi"].startswith("3.1")


def test_every_callable_route_is_documented_with_what_it_answers(doc: dict[str, Any]) -> None:
    documented = {key: {int(s) for s in op["responses"]} for key, op in operations(doc).items()}
    assert documented == EXPECTED


def test_operation_ids_are_the_route_names(doc: dict[str, Any]) -> None:
    ids = {key: op["operationId"] for key, op in operations(doc).items()}
    assert ids[("post", "/predict")] == "predict"
    assert ids[("get", "/jobs/{job_id}/{name}")] == "artifact"
    assert len(set(ids.values())) == len(ids)


def test_explain_documents_its_options_as_form_fields_too(doc: dict[str, Any]) -> None:
    operation = doc["paths"]["/explain"]["post"]
    form = operation["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
    query = {p["name"] for p in operation["parameters"] if p["in"] == "query"}
    assert query == {
        "methods",
        "targets",
        "layer",
        "activation_layer",
        "model",
        "force",
        "faithfulness",
        "compare_top",
    }
    assert set(form) == {"images"} | query


def test_every_method_has_a_title_and_every_list_of_methods_names_them_all(
    doc: dict[str, Any],
) -> None:
    assert set(METHOD_TITLES) == set(Method)
    titles = [METHOD_TITLES[m] for m in Method]
    tag = next(t["description"] for t in doc["tags"] if t["name"] == "explanations")
    listed = tag.removeprefix("Asynchronous explanations: ").removesuffix(".")
    assert listed.replace(" and ", ", ").split(", ") == titles
    # the values `methods=` takes, in the overview and in /explain's (and /v1/explain's) own
    explain = doc["paths"]["/explain"]["post"]["description"]
    native = doc["paths"]["/v1/explain"]["post"]["description"]
    for text in (doc["info"]["description"], explain, native):
        assert all(f"`{m.value}`" in text for m in Method), text
    # the layer-reading methods, where a layer is described
    layers = doc["components"]["schemas"]["ModelInfo"]["properties"]["explainable_layers"]
    layer = next(p for p in doc["paths"]["/explain"]["post"]["parameters"] if p["name"] == "layer")
    for method in LAYER_METHODS:
        assert METHOD_TITLES[method] in layers["description"]
        if method is not Method.ACTIVATIONS:  # it reads activation_layer
            assert METHOD_TITLES[method] in layer["description"]
    assert "Grad-CAM, saliency, activations" not in json.dumps(doc)


def test_models_documents_the_version_list(doc: dict[str, Any]) -> None:
    ok = doc["paths"]["/models"]["get"]["responses"]["200"]["content"]["application/json"]
    assert ok["schema"] == {"$ref": "#/components/schemas/ModelVersions"}
    versions = doc["components"]["schemas"]["ModelVersions"]
    assert set(versions["required"]) == {"served", "versions"}
    version = doc["components"]["schemas"]["ModelVersion"]["properties"]
    assert {"tag", "version", "created_at", "architecture", "accuracy", "demo", "int8"} <= set(
        version
    )


def test_every_error_response_is_the_error_body(doc: dict[str, Any]) -> None:
    for (method, path), op in operations(doc).items():
        for status, response in op["responses"].items():
            if int(status) < 400 or path in ("/readyz", "/livez"):
                continue
            schema = response["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/ErrorBody"}, (method, path, status)
    body = doc["components"]["schemas"]["ErrorBody"]
    assert body["required"] == ["error"]
    assert body["properties"]["error"]["type"] == "string"
    # FastAPI's own validation-error shape is never what Lantern answers.
    assert "HTTPValidationError" not in json.dumps(doc)


def test_every_503_documents_its_retry_after_header(doc: dict[str, Any]) -> None:
    # The queue's 503 (explain, jobs) and the overloaded model's (predict, predict_batch).
    for path, method in (
        ("/explain", "post"),
        ("/jobs/{job_id}", "get"),
        ("/predict", "post"),
        ("/predict_batch", "post"),
    ):
        header = doc["paths"][path][method]["responses"]["503"]["headers"]["Retry-After"]
        assert header["required"] and header["schema"]["type"] == "integer"


def test_artifacts_are_png_or_octet_stream_not_json(doc: dict[str, Any]) -> None:
    content = doc["paths"]["/jobs/{job_id}/{name}"]["get"]["responses"]["200"]["content"]
    assert "application/json" not in content
    assert {"image/png", "application/octet-stream"} <= set(content)
    assert all(c["schema"] == {"type": "string", "format": "binary"} for c in content.values())
    metrics = doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert set(metrics) == {"text/plain"}


def test_keys_are_security_schemes_that_apply_only_when_set(doc: dict[str, Any]) -> None:
    schemes = doc["components"]["securitySchemes"]
    assert schemes["bearerAuth"] == {**schemes["bearerAuth"], "type": "http", "scheme": "bearer"}
    assert schemes["apiKeyHeader"]["in"] == "header"
    assert schemes["apiKeyHeader"]["name"] == "X-API-Key"
    # Either key, or (LANTERN_API_KEYS empty) nothing.
    assert doc["security"] == [{"bearerAuth": []}, {"apiKeyHeader": []}, {}]
    for (_, path), op in operations(doc).items():
        if path in ("/livez", "/readyz"):
            assert op["security"] == [] and "401" not in op["responses"]
        else:
            assert "security" not in op and "401" in op["responses"]


def test_the_upload_routes_document_their_bodies(doc: dict[str, Any]) -> None:
    predict = doc["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert set(predict) == {"multipart/form-data", "image/*"}
    for path, field in (("/predict_batch", "images"), ("/explain", "images")):
        content = doc["paths"][path]["post"]["requestBody"]["content"]
        assert content["multipart/form-data"]["schema"]["required"] == [field]


def test_the_middleware_answers_docs_json_and_passes_everything_else() -> None:
    asyncio.run(_middleware_checks())


async def _middleware_checks() -> None:
    async def inner(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    middleware = OpenAPIDocument(inner, fastapi_app=app)
    transport = httpx.ASGITransport(app=middleware)
    async with httpx.AsyncClient(transport=transport, base_url="http://lantern") as client:
        served = await client.get(DOCS_PATH)
        assert served.status_code == 200
        assert served.headers["content-type"] == "application/json"
        assert served.json() == json.loads(json.dumps(build_document(app)))
        assert (await client.get("/predict")).status_code == 204
        assert (await client.post(DOCS_PATH)).status_code == 204  # not ours: passed on
