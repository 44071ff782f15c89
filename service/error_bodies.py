"""The framework's own 404 and 405 answers, rewritten to Lantern's `{"error": "..."}` body.

BentoML mounts the FastAPI app passively: a path no route matches (`/nope`, `/jobs/`, a
path with a newline in it) is answered by BentoML's router as `text/plain` "Not Found",
and a wrong method by FastAPI as `{"detail": "Method Not Allowed"}`. Every other error
Lantern answers is JSON with an `error` key, and /docs.json documents that; this ASGI
middleware (added with `Lantern.add_asgi_middleware`) keeps the promise for those two.
Responses that already carry an `error` key pass through untouched.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

REWRITTEN = (404, 405)
MAX_BUFFERED = 64 * 1024  # a framework 404/405 body is a few bytes; never buffer more


class ErrorBodies:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") == "HEAD":
            await self.app(scope, receive, send)
            return
        start: Message | None = None
        body = b""
        passing = False

        async def wrapped_send(message: Message) -> None:
            nonlocal start, body, passing
            if passing:
                await send(message)
            elif message["type"] == "http.response.start":
                if message["status"] in REWRITTEN:
                    start = message
                else:
                    passing = True
                    await send(message)
            elif message["type"] == "http.response.body" and start is not None:
                body += message.get("body", b"")
                if len(body) > MAX_BUFFERED:
                    passing = True
                    await send(start)
                    await send({**message, "body": body})
                elif not message.get("more_body", False):
                    await _finish(scope, start, body, send)
            else:
                await send(message)

        await self.app(scope, receive, wrapped_send)


async def _finish(scope: Scope, start: Message, body: bytes, send: Send) -> None:
    if _has_error_key(body):
        await send(start)
        await send({"type": "http.response.body", "body": body})
        return
    status = start["status"]
    headers = [
        (k, v) for k, v in start.get("headers", []) if k.lower() in (b"allow", b"retry-after")
    ]
    method, path = scope.get("method", "GET"), scope.get("path", "")[:200]
    if status == 405:
        allowed = next((v.decode("latin-1") for k, v in headers if k.lower() == b"allow"), "")
        message = f"{method} is not allowed on {path!r}" + (f"; use {allowed}" if allowed else "")
    else:
        message = f"no such route {method} {path!r}; the API is described at /docs"
    new_body = json.dumps({"error": message}).encode()
    headers += [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(new_body)).encode()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": new_body})


def _has_error_key(body: bytes) -> bool:
    try:
        decoded = json.loads(body)
    except ValueError:
        return False
    return isinstance(decoded, dict) and "error" in decoded
