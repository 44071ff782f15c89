"""What stands in front of every route, BentoML's own included: API keys, metric labels, tracing.

BentoML builds one Starlette app per worker. Its middleware stack, outermost first, is
(bentoml 1.4, `_bentoml_impl.server.app.ServiceAppFactory.middlewares`):

    RunnerTrafficMetricsMiddleware   request metrics, labelled by `scope["path"]`
    OpenTelemetryMiddleware, AccessLogMiddleware, Timeout/MaxConcurrency
    Service.add_asgi_middleware(...) <- ApiKeyMiddleware here
    CORS, ContextMiddleware
    routes: /livez /readyz /metrics /docs.json ... and the FastAPI app mounted at /

`ApiKeyMiddleware` therefore guards BentoML's /metrics and /docs.json as well as the
FastAPI routes. The metrics middleware runs *before* any service middleware, so a service
middleware cannot change the label it records: `install_templated_metrics()` swaps in a
subclass that shows it the route template (`/jobs/{job_id}`, `other` for unmatched paths)
and hands the real path back to everything inside it, so routing never sees the template.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
from collections.abc import Iterator, Sequence
from functools import lru_cache
from typing import Any

log = logging.getLogger("lantern.service")

UNMATCHED = "other"
# BentoML's own routes (the FastAPI app's are read from the app itself).
BENTOML_ROUTES = ("/livez", "/healthz", "/readyz", "/metrics", "/docs.json", "/schema.json")
# Open without a key: the probes, and the web page's static shell (it holds no data; it
# asks for a key when the API answers 401).
PUBLIC_PATHS = frozenset({"/livez", "/readyz", "/", "/docs"})
PUBLIC_PREFIXES = ("/static/", "/static_content/")  # the page's and Swagger UI's files
_RAW_PATH = "lantern.raw_path"


# --- route templates ----------------------------------------------------------------------


def _route_paths(routes: Sequence[Any], prefix: str = "") -> Iterator[str]:
    """Every route path of an app, walking into included routers and mounts."""
    for route in routes:
        path = getattr(route, "path", None)
        inner = getattr(route, "original_router", None)  # FastAPI >= 0.16x include_router
        if inner is not None:
            context = getattr(route, "include_context", None)
            yield from _route_paths(inner.routes, prefix + getattr(context, "prefix", ""))
        elif isinstance(path, str) and hasattr(route, "path_regex"):
            yield prefix + path
        elif isinstance(path, str) and hasattr(route, "routes"):  # a Mount
            yield from _route_paths(route.routes, prefix + path)


@lru_cache(maxsize=1)
def _route_patterns() -> tuple[frozenset[str], tuple[tuple[re.Pattern[str], str], ...]]:
    from starlette.routing import compile_path

    from service.api import app
    from service.native import ROUTES

    exact = set(BENTOML_ROUTES) | set(ROUTES.values())  # the @bentoml.api methods' routes
    patterns: list[tuple[re.Pattern[str], str]] = []
    for path in _route_paths(app.routes):
        template = re.sub(r"\{(\w+):\w+\}", r"{\1}", path)
        if "{" in template:
            patterns.append((compile_path(path)[0], template))
        else:
            exact.add(template)
    return frozenset(exact), tuple(patterns)


def route_template(path: str) -> str:
    """The route a path belongs to ("/jobs/{job_id}/{name}"), or "other": a bounded set."""
    exact, patterns = _route_patterns()
    if path in exact:
        return path
    for regex, template in patterns:
        if regex.match(path):
            return template
    return UNMATCHED


class _RestorePath:
    """Inside the metrics middleware: give the app the real path back."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if _RAW_PATH in scope:
            scope = dict(scope)
            scope["path"] = scope.pop(_RAW_PATH)
        await self.app(scope, receive, send)


def install_templated_metrics() -> bool:
    """Make BentoML's request metrics label by route template instead of the raw path.

    BentoML imports its metrics middleware class from `instruments` each time it builds
    the app, so replacing the module attribute before the app is built is enough. Returns
    False (and logs) if this BentoML has no such class.
    """
    from bentoml._internal.server.http import instruments

    base = getattr(instruments, "RunnerTrafficMetricsMiddleware", None)
    if base is None:
        log.warning("bentoml has no RunnerTrafficMetricsMiddleware; metrics keep raw paths")
        return False
    if getattr(base, "_lantern_templated", False):
        return True

    class TemplatedTrafficMetrics(base):  # type: ignore[misc, valid-type]
        _lantern_templated = True

        def __init__(self, app: Any, *args: Any, **kwargs: Any):
            super().__init__(_RestorePath(app), *args, **kwargs)

        async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope.get("type") in ("http", "websocket") and scope.get("path") != "/metrics":
                path = scope["path"]
                scope = {**scope, "path": route_template(path), _RAW_PATH: path}
            await super().__call__(scope, receive, send)

    instruments.RunnerTrafficMetricsMiddleware = TemplatedTrafficMetrics  # type: ignore[misc]
    return True


# --- tracing ------------------------------------------------------------------------------


def tracing_config(service_name: str = "lantern") -> dict[str, Any]:
    """The `tracing` part of the service's BentoML config (`@bentoml.service(tracing=...)`).

    A trace exporter can be configured for every service (`tracing.exporter_type=otlp ...`
    in BENTOML_CONFIG or BENTOML_CONFIG_OPTIONS, as the README shows) or for this one
    (`services.lantern.tracing.exporter_type=otlp ...`); by default there is none.

    - **None configured:** every URL excluded from BentoML's OpenTelemetry middleware.
      BentoML's tracer provider has no span processor then, so no span is ever exported,
      yet its middleware still starts a span, wraps `receive` and `send` and sets
      attributes on every request: the largest single Python cost of a /predict on the
      event loop, ~14 % of its CPU (BENCHMARKS.md, "A cheaper model"). An excluded-URL
      pattern that every URL matches makes it pass each request straight through. What
      goes with the span: BentoML's `X-BentoML-Request-ID` header on the /v1 routes, which
      it takes from the span's id; Lantern's own `X-Request-ID` (RequestIdMiddleware) is on
      every response.
    - **For every service:** those settings, carried into the service's own. When BentoML
      starts a service (bentoml 1.4, `Service.inject_config`) it merges the service's
      section over the global one, and that section's defaults (all None) replace the
      global `tracing` settings: the exporter would be dropped and nothing exported.
    - **For this service:** nothing; BentoML applies the user's section as it is.
    """
    from bentoml._internal.configuration.containers import BentoMLContainer

    # The user's configuration, which bentoml has read by the time it is imported.
    config = BentoMLContainer.config
    try:
        services = config.services.get() or {}
    except KeyError:  # no `services` section configured at all
        services = {}
    own = (services.get(service_name) or {}).get("tracing") or {}
    if own.get("exporter_type"):
        return {}
    every = config.tracing.get() or {}
    if every.get("exporter_type"):
        return _without_none(every)
    return {"excluded_urls": "."}  # a regular expression that every URL contains


def _without_none(settings: dict[str, Any]) -> dict[str, Any]:
    """`settings` without the keys left unset (None), nested sections included."""
    kept: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            value = _without_none(value)
            if value:
                kept[key] = value
        elif value is not None:
            kept[key] = value
    return kept


# --- API keys -----------------------------------------------------------------------------

MISSING_KEY = (
    "this Lantern API needs an API key: send it as 'Authorization: Bearer <key>' or "
    "'X-API-Key: <key>'"
)
INVALID_KEY = "the API key is not valid for this Lantern API; check LANTERN_API_KEY"


def presented_key(headers: Sequence[tuple[bytes, bytes]]) -> bytes | None:
    """The key a request carries (X-API-Key, or a Bearer Authorization), or None."""
    for name, value in headers:
        lower = name.lower()
        if lower == b"x-api-key" and value.strip():
            return value.strip()
        if lower == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                return token.strip()
    return None


def key_matches(key: bytes, keys: Sequence[bytes]) -> bool:
    """Constant-time comparison against every configured key (no early exit)."""
    matched = False
    for candidate in keys:
        matched |= hmac.compare_digest(key, candidate)
    return matched


def is_public(path: str, metrics_public: bool) -> bool:
    if path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES):
        return True
    return metrics_public and path == "/metrics"


class ApiKeyMiddleware:
    """401 with a JSON body and `WWW-Authenticate: Bearer` unless the request carries one of
    LANTERN_API_KEYS; does nothing when no key is set. Keys are never logged."""

    def __init__(
        self, app: Any, keys: Sequence[str] | None = None, metrics_public: bool | None = None
    ):
        from lantern.core.settings import get_settings

        settings = get_settings()
        self.app = app
        self.keys = [k.encode() for k in (keys if keys is not None else settings.api_key_list())]
        self.metrics_public = settings.metrics_public if metrics_public is None else metrics_public

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if (
            not self.keys
            or scope.get("type") not in ("http", "websocket")
            or is_public(scope.get("path", ""), self.metrics_public)
        ):
            await self.app(scope, receive, send)
            return
        key = presented_key(scope.get("headers") or [])
        if key is not None and key_matches(key, self.keys):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = json.dumps({"error": MISSING_KEY if key is None else INVALID_KEY}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", b'Bearer realm="lantern"'),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


# --- request ids --------------------------------------------------------------------------


class RequestIdMiddleware:
    """Every request gets an id: its own `X-Request-ID` when that is short and safe
    (lantern.core.logs.REQUEST_ID_RE), otherwise a new one. It is echoed in the response's
    `X-Request-ID`, tags every log line written while the request runs (BentoML's access
    line for it included: that middleware is outside this one, but it logs from inside
    the `send` this one wraps), and /explain stores it in the job it enqueues."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        from lantern.core.logs import REQUEST_ID_HEADER, log_context, request_id_from

        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        header = REQUEST_ID_HEADER.lower().encode()
        sent = next((v for k, v in scope.get("headers") or [] if k.lower() == header), None)
        request_id = request_id_from(sent.decode("latin-1") if sent is not None else None)

        async def send_with_id(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != header]
                message = {**message, "headers": [*headers, (header, request_id.encode())]}
            await send(message)

        with log_context(request_id=request_id):
            await self.app(scope, receive, send_with_id)
