"""service.error_bodies: the framework's bare 404/405 answers become `{"error": ...}`."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from service.error_bodies import ErrorBodies


async def _job(_: Request) -> Response:
    return JSONResponse({"error": "no job ex-1"}, status_code=404)


async def _text(_: Request) -> Response:
    return PlainTextResponse("fine")


async def _detail(_: Request) -> Response:
    return JSONResponse({"detail": "Not Found"}, status_code=404)


INNER = Starlette(
    routes=[
        Route("/jobs/{job_id}", _job, methods=["GET"]),
        Route("/text", _text),
        Route("/detail", _detail),
    ]
)


def _requests(*calls: tuple[str, str]) -> list[httpx.Response]:
    async def main() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=ErrorBodies(INNER))
        async with httpx.AsyncClient(transport=transport, base_url="http://lantern") as client:
            return [await client.request(method, path) for method, path in calls]

    return asyncio.run(main())


def _error(response: httpx.Response) -> Any:
    assert response.headers["content-type"] == "application/json"
    assert int(response.headers["content-length"]) == len(response.content)
    body = json.loads(response.content)
    assert set(body) == {"error"}
    return body["error"]


def test_an_unknown_route_answers_a_json_error_not_plain_text() -> None:
    (response,) = _requests(("GET", "/no/such%0Aroute"))
    assert response.status_code == 404
    assert "no such route GET '/no/such\\nroute'" in _error(response)


def test_a_wrong_method_answers_a_json_error_that_names_the_allowed_ones() -> None:
    (response,) = _requests(("POST", "/jobs/ex-1"))
    assert response.status_code == 405
    allowed = response.headers["allow"]
    assert set(allowed.split(", ")) == {"GET", "HEAD"}
    assert _error(response) == f"POST is not allowed on '/jobs/ex-1'; use {allowed}"


def test_lanterns_own_errors_and_successes_pass_untouched() -> None:
    job, text, detail, head = _requests(
        ("GET", "/jobs/ex-1"), ("GET", "/text"), ("GET", "/detail"), ("HEAD", "/nope")
    )
    assert (job.status_code, job.json()) == (404, {"error": "no job ex-1"})
    assert (text.status_code, text.text) == (200, "fine")
    assert detail.status_code == 404 and "no such route" in _error(detail)  # FastAPI's shape
    assert head.status_code == 404 and head.content == b""
