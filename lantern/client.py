"""The Python client of the Lantern API: `LanternClient` (sync) and `AsyncLanternClient`.

Used by `lantern predict` and `lantern explain`, and documented in the README ("Python
client"). Torch-free and built on httpx. Both clients share one description of every call
and of how its answer is read (`_Api`), and one wait loop (`_Waiter`); each only sends.
They retry 503 and 429 answers as `Retry-After` says, within bounds (RetryPolicy), and
turn every way a call can go wrong into a LanternError a person can act on:

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

import asyncio
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


@dataclass(frozen=True)
class RetryPolicy:
    """How a client retries an answer that says "not now": 503 (the model is overloaded,
    the queue is down) and 429 (too many requests).

    It waits the answer's `Retry-After` seconds (`default_delay` when it sends none or an
    HTTP date), at most `max_delay` per wait, and tries at most `attempts` times in all
    and never past `total_s` seconds since the first try: a wait that would end later is
    not started. Then the last answer's error is raised. `RetryPolicy(attempts=1)`: no
    retries.
    """

    attempts: int = 5
    total_s: float = 60.0
    default_delay: float = 1.0
    max_delay: float = 30.0
    statuses: frozenset[int] = frozenset({429, 503})

    def delay(self, response: httpx.Response, attempt: int, elapsed: float) -> float | None:
        """Seconds to wait before try `attempt + 1`, or None to stop and report."""
        if response.status_code not in self.statuses or attempt >= self.attempts:
            return None
        wait = min(retry_after(response, self.default_delay), self.max_delay)
        return wait if elapsed + wait <= self.total_s else None


NO_RETRIES = RetryPolicy(attempts=1)


def retry_after(response: httpx.Response, default: float) -> float:
    """The `Retry-After` header in seconds (`default` when absent, a date, or nonsense)."""
    value = response.headers.get("Retry-After", "").strip()
    try:
        seconds = float(value)
    except ValueError:
        return default
    return seconds if 0 <= seconds < float("inf") else default


@dataclass(frozen=True)
class Call:
    """One API call, as data: what both clients send (`request`) and how they read it."""

    method: str
    path: str
    kwargs: dict[str, Any]


class _Api:
    """What LanternClient and AsyncLanternClient share: how each call is made and how each
    answer is read, with no I/O of its own (each client sends the Calls its own way)."""

    def __init__(self, url: str, api_key: str | None, retry: RetryPolicy | None):
        self.url = url.rstrip("/")
        key = api_key if api_key is not None else os.environ.get(API_KEY_ENV, "")
        self.headers = {"Authorization": f"Bearer {key.strip()}"} if key.strip() else {}
        self.retry = retry if retry is not None else RetryPolicy()

    # --- the calls ------------------------------------------------------------------------

    @staticmethod
    def predict(image: ImageFile, top_k: int) -> Call:
        return Call("POST", "/predict", {"params": {"top_k": top_k}, "files": {"image": image}})

    @staticmethod
    def predict_batch(images: Sequence[ImageFile], top_k: int) -> Call:
        files = [("images", image) for image in images]
        return Call("POST", "/predict_batch", {"params": {"top_k": top_k}, "files": files})

    @staticmethod
    def explain(
        images: Sequence[ImageFile],
        methods: Sequence[str],
        targets: Sequence[int | str | None] | None,
        layer: str | None,
        activation_layer: str | None,
        model: str | None,
        faithfulness: bool,
        force: bool,
        compare_top: int | None = None,
    ) -> Call:
        data: dict[str, str] = {"methods": ",".join(methods)}
        if targets is not None:
            data["targets"] = ",".join("" if t is None else str(t) for t in targets)
        for name, value in (
            ("layer", layer),
            ("activation_layer", activation_layer),
            ("model", model),
        ):
            if value:
                data[name] = value
        if faithfulness:
            data["faithfulness"] = "true"
        if force:
            data["force"] = "true"
        if compare_top is not None:
            data["compare_top"] = str(compare_top)
        files = [("images", image) for image in images]
        return Call("POST", "/explain", {"data": data, "files": files})

    @staticmethod
    def job(job_id: str) -> Call:
        return Call("GET", f"/jobs/{job_id}", {})

    # --- the answers ----------------------------------------------------------------------

    def transport_error(self, error: httpx.TransportError) -> LanternError:
        if isinstance(error, httpx.TimeoutException):
            return ServiceUnreachable(
                f"the Lantern service at {self.url} did not answer in time; it may be "
                "overloaded: retry, or send fewer images per request"
            )
        return ServiceUnreachable(
            f"cannot reach the Lantern service at {self.url} ({_reason(error)}); start it "
            "with `lantern up` (or `lantern serve`), or pass --url"
        )

    def checked(self, response: httpx.Response, attempts: int = 1) -> httpx.Response:
        """`response` if it is a success; otherwise the LanternError it amounts to."""
        if response.status_code < 400:
            return response
        message = _error_message(response)
        if attempts > 1:
            message += f" (tried {attempts} times)"
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

    def json(self, response: httpx.Response, path: str) -> dict[str, Any]:
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


class _Waiter:
    """wait()'s logic, shared: report progress, stop on finished or failed, time out."""

    def __init__(
        self,
        job_id: str,
        timeout: float | None,
        on_progress: Callable[[dict[str, Any]], None] | None,
    ):
        self.job_id, self.timeout, self.on_progress = job_id, timeout, on_progress
        self.deadline = None if timeout is None else time.monotonic() + timeout

    def settled(self, status: dict[str, Any]) -> bool:
        """True when `status` is final (finished); raises JobFailed, or JobError on timeout."""
        if self.on_progress is not None:
            self.on_progress(status)
        if status["status"] == "failed":
            raise JobFailed(self.job_id, status.get("error") or "no reason given")
        if status["status"] == "finished":
            return True
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise JobError(
                f"explanation job {self.job_id} is still {status['status']} after "
                f"{self.timeout:.0f} s; is a `lantern worker` running?"
            )
        return False


def artifact_files(status: dict[str, Any]) -> list[tuple[str, str]]:
    """(url, file name) of every artifact of a finished job's status, in a stable order."""
    files: dict[str, str] = {}
    for image in (status.get("manifest") or {}).get("images", []):
        for url in image.get("urls", {}).values():
            files[url] = PurePosixPath(url).name
    return sorted(files.items(), key=lambda item: item[1])


def _save(content: bytes, dest: Path) -> Path:
    """Write atomically: a half-written file never carries the final name."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".part")
    partial.write_bytes(content)
    partial.replace(dest)
    return dest


def _job_folder(status: dict[str, Any], folder: Path) -> list[tuple[str, Path]]:
    from lantern.core.store import is_valid_file_name

    pairs = []
    for url, name in artifact_files(status):
        if not is_valid_file_name(name):
            raise ServiceError(f"the job's manifest names a file {name!r}; is this Lantern?")
        pairs.append((url, folder / name))
    return pairs


class LanternClient:
    """A client of the Lantern API at `url`, with one connection pool. Use as a context
    manager, or close().

    `api_key`: sent as `Authorization: Bearer <key>` on every request; None reads the
    LANTERN_API_KEY environment variable (unset or empty: no key). `retry`: how 503 and 429
    answers are retried (RetryPolicy; default: up to 5 tries within 60 s, waiting what
    `Retry-After` says). Every failure is a LanternError (see the module doc).
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        timeout: float = DEFAULT_TIMEOUT_S,
        api_key: str | None = None,
        retry: RetryPolicy | None = None,
    ):
        self._api = _Api(url, api_key, retry)
        self.url = self._api.url
        self._http = httpx.Client(base_url=self.url, timeout=timeout, headers=self._api.headers)

    def __enter__(self) -> LanternClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # --- predictions ----------------------------------------------------------------------

    def predict(self, image: ImageFile, top_k: int = 5) -> dict[str, Any]:
        """{"label", "class_index", "probability", "top_k", "model_version", "precision"}
        for one image, given as (file name, bytes)."""
        return self._json(_Api.predict(image, top_k))

    def predict_batch(self, images: Sequence[ImageFile], top_k: int = 5) -> list[dict[str, Any]]:
        """One prediction per image, in order."""
        return list(self._json(_Api.predict_batch(images, top_k))["predictions"])

    # --- explanations ---------------------------------------------------------------------

    def explain(
        self,
        images: Sequence[ImageFile],
        methods: Sequence[str] = ("gradcam",),
        targets: Sequence[int | str | None] | None = None,
        layer: str | None = None,
        activation_layer: str | None = None,
        *,
        model: str | None = None,
        faithfulness: bool = False,
        force: bool = False,
        compare_top: int | None = None,
    ) -> dict[str, Any]:
        """Submit a job: {"job_id", "status", "status_url", "cached", ...}. A request the
        service has seen before comes back `cached` with its full status (maybe finished).
        `compare_top=k` (2..5) also explains each image's k most probable classes: each
        manifest image then has `compare`, one entry per class with its files."""
        call = _Api.explain(
            images,
            methods,
            targets,
            layer,
            activation_layer,
            model,
            faithfulness,
            force,
            compare_top,
        )
        return self._json(call)

    def job(self, job_id: str) -> dict[str, Any]:
        """The job's status: {"status", "progress": {"done", "total"}, "error", "manifest"}."""
        return self._json(_Api.job(job_id))

    def wait(
        self,
        job_id: str,
        timeout: float | None = None,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        interval: float = POLL_INTERVAL_S,
    ) -> dict[str, Any]:
        """Poll until the job is finished and return its status; `on_progress(status)` is
        called with every status read. JobFailed if it failed, JobError after `timeout`."""
        waiter = _Waiter(job_id, timeout, on_progress)
        while True:
            status = self.job(job_id)
            if waiter.settled(status):
                return status
            time.sleep(interval)

    def download(self, path: str, dest: Path) -> Path:
        """Fetch an artifact (a "/jobs/<id>/<file>" url from a manifest) into `dest`,
        atomically: a half-written file never carries the final name."""
        return _save(self._request(Call("GET", path, {})).content, dest)

    def download_all(self, status: dict[str, Any], folder: Path) -> list[Path]:
        """Every artifact of a finished job (its status, e.g. from wait()) into `folder`."""
        return [self.download(url, dest) for url, dest in _job_folder(status, folder)]

    # --- plumbing -------------------------------------------------------------------------

    def _json(self, call: Call) -> dict[str, Any]:
        return self._api.json(self._request(call), call.path)

    def _request(self, call: Call) -> httpx.Response:
        started = time.monotonic()
        attempt = 1
        while True:
            try:
                response = self._http.request(call.method, call.path, **call.kwargs)
            except httpx.TransportError as e:
                raise self._api.transport_error(e) from None
            wait = self._api.retry.delay(response, attempt, time.monotonic() - started)
            if wait is None:
                return self._api.checked(response, attempt)
            time.sleep(wait)
            attempt += 1


class AsyncLanternClient:
    """The async twin of LanternClient (httpx.AsyncClient): the same calls, answers,
    errors and retries, awaited. `async with AsyncLanternClient(url) as client: ...`"""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        timeout: float = DEFAULT_TIMEOUT_S,
        api_key: str | None = None,
        retry: RetryPolicy | None = None,
    ):
        self._api = _Api(url, api_key, retry)
        self.url = self._api.url
        self._http = httpx.AsyncClient(
            base_url=self.url, timeout=timeout, headers=self._api.headers
        )

    async def __aenter__(self) -> AsyncLanternClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def predict(self, image: ImageFile, top_k: int = 5) -> dict[str, Any]:
        """See LanternClient.predict."""
        return await self._json(_Api.predict(image, top_k))

    async def predict_batch(
        self, images: Sequence[ImageFile], top_k: int = 5
    ) -> list[dict[str, Any]]:
        """See LanternClient.predict_batch."""
        return list((await self._json(_Api.predict_batch(images, top_k)))["predictions"])

    async def explain(
        self,
        images: Sequence[ImageFile],
        methods: Sequence[str] = ("gradcam",),
        targets: Sequence[int | str | None] | None = None,
        layer: str | None = None,
        activation_layer: str | None = None,
        *,
        model: str | None = None,
        faithfulness: bool = False,
        force: bool = False,
        compare_top: int | None = None,
    ) -> dict[str, Any]:
        """See LanternClient.explain."""
        call = _Api.explain(
            images,
            methods,
            targets,
            layer,
            activation_layer,
            model,
            faithfulness,
            force,
            compare_top,
        )
        return await self._json(call)

    async def job(self, job_id: str) -> dict[str, Any]:
        """See LanternClient.job."""
        return await self._json(_Api.job(job_id))

    async def wait(
        self,
        job_id: str,
        timeout: float | None = None,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        interval: float = POLL_INTERVAL_S,
    ) -> dict[str, Any]:
        """See LanternClient.wait."""
        waiter = _Waiter(job_id, timeout, on_progress)
        while True:
            status = await self.job(job_id)
            if waiter.settled(status):
                return status
            await asyncio.sleep(interval)

    async def download(self, path: str, dest: Path) -> Path:
        """See LanternClient.download."""
        return _save((await self._request(Call("GET", path, {}))).content, dest)

    async def download_all(self, status: dict[str, Any], folder: Path) -> list[Path]:
        """See LanternClient.download_all."""
        return [await self.download(url, dest) for url, dest in _job_folder(status, folder)]

    async def _json(self, call: Call) -> dict[str, Any]:
        return self._api.json(await self._request(call), call.path)

    async def _request(self, call: Call) -> httpx.Response:
        started = time.monotonic()
        attempt = 1
        while True:
            try:
                response = await self._http.request(call.method, call.path, **call.kwargs)
            except httpx.TransportError as e:
                raise self._api.transport_error(e) from None
            wait = self._api.retry.delay(response, attempt, time.monotonic() - started)
            if wait is None:
                return self._api.checked(response, attempt)
            await asyncio.sleep(wait)
            attempt += 1


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
