"""A small HTTP client for the Lantern API, used by `lantern predict` and `lantern explain`.

Torch-free and built on httpx. It speaks only the public API (the one the web page uses)
and turns every way a call can go wrong into a LanternError a person can act on:

    LanternError
    ├── ServiceUnreachable   nothing answers at the URL (connection refused, DNS, timeout)
    ├── RequestRejected      4xx: the service refused the request; .status and the server's
    │                        own message (a bad file, too many images, a bad parameter)
    ├── Unauthorized         401: no API key, or not one the service accepts (every later
    │                        request would fail the same way, so the batch commands stop)
    ├── ServiceError         5xx, or an answer that is not the API's (503: queue is down)
    └── JobFailed            an explanation job that ended in "failed"; the job's error
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import re
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Generic, TypeVar

import httpx

from lantern.core.errors import DataError, JobError, LanternError, UsageError

DEFAULT_URL = "http://127.0.0.1:3000"
DEFAULT_TIMEOUT_S = 120.0  # a batch on a busy CPU-only server can take a while
POLL_INTERVAL_S = 0.5

API_KEY_ENV = "LANTERN_API_KEY"

T = TypeVar("T")
ImageFile = tuple[str, bytes]  # (file name sent to the service, the encoded image)


class ServiceUnreachable(LanternError):
    pass


class Unauthorized(LanternError):
    pass


class RequestRejected(LanternError):
    """The service answered 4xx; str() is its message, `status` the HTTP status."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status
        self.message = message

    @property
    def too_many_images(self) -> bool:
        """The request carried more images than the service takes at once."""
        return re.search(r"too many files|images in one (job|request)", self.message) is not None

    @property
    def image_limit(self) -> int | None:
        """When too_many_images: how many the service takes, if it said so."""
        m = re.search(r"limit is ([\d,]+)", self.message)
        return int(m.group(1).replace(",", "")) if m and self.too_many_images else None


class ServiceError(LanternError):
    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class JobFailed(JobError):
    def __init__(self, job_id: str, error: str):
        super().__init__(f"explanation job {job_id} failed: {error}")
        self.job_id = job_id
        self.error = error


def quiet_http_logs(verbose: bool = False) -> None:
    """httpx logs every request at INFO; a batch command shows a progress bar instead."""
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.WARNING)


class LanternClient:
    """One connection pool to the service at `url`. Use as a context manager, or close()."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        timeout: float = DEFAULT_TIMEOUT_S,
        api_key: str | None = None,
    ):
        """`api_key`: sent as `Authorization: Bearer <key>` on every request; None reads
        the LANTERN_API_KEY environment variable (unset or empty: no key)."""
        self.url = url.rstrip("/")
        key = api_key if api_key is not None else os.environ.get(API_KEY_ENV, "")
        headers = {"Authorization": f"Bearer {key.strip()}"} if key.strip() else {}
        self._http = httpx.Client(base_url=self.url, timeout=timeout, headers=headers)

    def __enter__(self) -> LanternClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # --- predictions ----------------------------------------------------------------------

    def predict(self, image: ImageFile, top_k: int = 5) -> dict[str, Any]:
        """{"label", "class_index", "probability", "top_k", "model_version"} for one image."""
        return self._json("POST", "/predict", params={"top_k": top_k}, files={"image": image})

    def predict_batch(self, images: Sequence[ImageFile], top_k: int = 5) -> list[dict[str, Any]]:
        """One prediction per image, in order."""
        body = self._json(
            "POST",
            "/predict_batch",
            params={"top_k": top_k},
            files=[("images", image) for image in images],
        )
        return list(body["predictions"])

    # --- explanations ---------------------------------------------------------------------

    def explain(
        self,
        images: Sequence[ImageFile],
        methods: Sequence[str] = ("gradcam",),
        targets: Sequence[int | None] | None = None,
        layer: str | None = None,
        activation_layer: str | None = None,
    ) -> dict[str, Any]:
        """Submit a job: {"job_id", "status", "status_url", "cached", ...}. A request the
        service has seen before comes back `cached` with its full status (maybe finished)."""
        data: dict[str, str] = {"methods": ",".join(methods)}
        if targets is not None:
            data["targets"] = ",".join("" if t is None else str(t) for t in targets)
        if layer:
            data["layer"] = layer
        if activation_layer:
            data["activation_layer"] = activation_layer
        return self._json(
            "POST", "/explain", data=data, files=[("images", image) for image in images]
        )

    def job(self, job_id: str) -> dict[str, Any]:
        """The job's status: {"status", "progress": {"done", "total"}, "error", "manifest"}."""
        return self._json("GET", f"/jobs/{job_id}")

    def wait(
        self,
        job_id: str,
        timeout: float | None = None,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        interval: float = POLL_INTERVAL_S,
    ) -> dict[str, Any]:
        """Poll until the job is finished and return its status; JobFailed if it failed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            status = self.job(job_id)
            if on_progress is not None:
                on_progress(status)
            if status["status"] == "failed":
                raise JobFailed(job_id, status.get("error") or "no reason given")
            if status["status"] == "finished":
                return status
            if deadline is not None and time.monotonic() > deadline:
                raise JobError(
                    f"explanation job {job_id} is still {status['status']} after "
                    f"{timeout:.0f} s; is a `lantern worker` running?"
                )
            time.sleep(interval)

    def download(self, path: str, dest: Path) -> Path:
        """Fetch an artifact (a "/jobs/<id>/<file>" url from a manifest) into `dest`,
        atomically: a half-written file never carries the final name."""
        content = self._request("GET", path).content
        dest.parent.mkdir(parents=True, exist_ok=True)
        partial = dest.with_name(dest.name + ".part")
        partial.write_bytes(content)
        partial.replace(dest)
        return dest

    # --- plumbing -------------------------------------------------------------------------

    def _json(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        response = self._request(method, path, **kwargs)
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise ServiceError(
                f"{self.url}{path} did not answer with JSON; is this a Lantern service?",
                response.status_code,
            )
        return body

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TimeoutException:
            raise ServiceUnreachable(
                f"the Lantern service at {self.url} did not answer in time; it may be "
                "overloaded: retry, or send fewer images per request"
            ) from None
        except httpx.TransportError as e:
            raise ServiceUnreachable(
                f"cannot reach the Lantern service at {self.url} ({_reason(e)}); start it "
                "with `lantern up` (or `lantern serve`), or pass --url"
            ) from None
        if response.status_code >= 400:
            message = _error_message(response)
            if response.status_code == 401:
                raise Unauthorized(
                    f"the Lantern service at {self.url} refused the request: {message} "
                    f"(pass --api-key, or set {API_KEY_ENV})"
                )
            if response.status_code < 500:
                raise RequestRejected(message, response.status_code)
            raise ServiceError(
                f"the service failed ({response.status_code}): {message}", response.status_code
            )
        return response


def _error_message(response: httpx.Response) -> str:
    """The API's {"error": "..."} message, or a short description of another body."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return str(body["error"])
    if response.status_code == 404:
        return f"{response.request.url.path} was not found; is this a Lantern service?"
    text = response.text.strip().splitlines()[0][:200] if response.text.strip() else ""
    return text or response.reason_phrase or f"HTTP {response.status_code}"


def _reason(e: httpx.TransportError) -> str:
    text = str(e) or type(e).__name__
    if "Connection refused" in text or "[Errno 111]" in text:
        return "connection refused"
    return text


# --- local image files, for the batch commands ----------------------------------------------

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


@dataclass(frozen=True)
class InputImage:
    """One image to send: where it is, and where its results go (`key`, relative to --out).

    A folder argument contributes the image files under it (recursively, by extension),
    keyed by their path inside that folder without the extension; a file argument is
    keyed by its own stem. `cats/tom.jpg` in `photos/` becomes key `cats/tom`.
    """

    path: Path
    key: str

    @property
    def name(self) -> str:
        """The file name sent to the service (it names the artifacts after it)."""
        return self.path.name

    def read(self) -> bytes:
        try:
            return self.path.read_bytes()
        except OSError as e:
            raise DataError(f"cannot read {self.path}: {e.strerror or e}") from None


def collect_images(paths: Sequence[Path], exclude: Path | None = None) -> list[InputImage]:
    """Every image under `paths`, in a stable order, with unique keys.

    Hidden files and folders, and anything under `exclude` (the output folder), are
    skipped. Two inputs that would share a key (`a.png` and `a.jpg`) keep their extension
    in the key instead.
    """
    excluded = exclude.resolve() if exclude is not None else None
    found: list[tuple[Path, PurePosixPath]] = []
    for root in paths:
        if root.is_dir():
            for path in sorted(root.rglob("*")):
                inside = path.relative_to(root)
                if (
                    path.is_file()
                    and path.suffix.lower() in IMAGE_EXTENSIONS
                    and not any(part.startswith(".") for part in inside.parts)
                    and not (excluded is not None and path.resolve().is_relative_to(excluded))
                ):
                    found.append((path, PurePosixPath(inside.as_posix())))
        elif root.is_file():
            found.append((root, PurePosixPath(root.name)))
        else:
            raise UsageError(f"{root} does not exist")
    stems = Counter(str(rel.with_suffix("")) for _, rel in found)
    images: list[InputImage] = []
    seen: dict[str, Path] = {}
    for source, rel in found:
        key = str(rel.with_suffix("")) if stems[str(rel.with_suffix(""))] == 1 else str(rel)
        if key in seen:
            raise UsageError(
                f"{seen[key]} and {source} would write their results to the same place "
                f"({key}); run them separately"
            )
        seen[key] = source
        images.append(InputImage(source, key))
    return images


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_csv_atomically(path: Path, fields: Sequence[str], rows: Sequence[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".part")
    with partial.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    partial.replace(path)


class Batches(Generic[T]):
    """Items handed out in chunks of at most `size`, smaller after a rejection.

    When the service refuses a chunk, `rejected()` puts it back: re-split to the service's
    stated limit when it carried too many images, one by one otherwise, so one bad file
    is isolated instead of sinking its neighbours. A single item it cannot split is the
    caller's to report.
    """

    def __init__(self, items: Sequence[T], size: int):
        if size < 1:
            raise UsageError("the batch size must be at least 1")
        self.size = size
        self._items: deque[T] = deque(items)
        self._retry: deque[list[T]] = deque()

    def __bool__(self) -> bool:
        return bool(self._items or self._retry)

    def next(self) -> list[T]:
        if self._retry:
            return self._retry.popleft()
        return [self._items.popleft() for _ in range(min(self.size, len(self._items)))]

    def rejected(self, chunk: list[T], error: RequestRejected) -> bool:
        """True if `chunk` was put back in smaller pieces; False if it cannot be split."""
        if len(chunk) == 1:
            return False
        if error.too_many_images:
            limit = error.image_limit
            self.size = max(1, min(self.size, limit if limit else len(chunk) // 2))
            pieces = [chunk[i : i + self.size] for i in range(0, len(chunk), self.size)]
        else:
            pieces = [[item] for item in chunk]
        self._retry.extendleft(reversed(pieces))
        return True
