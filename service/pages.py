"""The web page and the API docs page, with their static files. No data: the page asks the
API (and for a key, when the API wants one).

GET  /                     the web page (service/static/index.html)
GET  /docs                 Swagger UI for /docs.json
GET  /static/{file}        their scripts and style sheets
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, JSONResponse, Response

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
        return JSONResponse({"error": f"no such file {name!r}"}, status_code=404)
    return FileResponse(path, media_type=STATIC_TYPES.get(path.suffix, "application/octet-stream"))
