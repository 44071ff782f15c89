"""Against a real `lantern serve` (BentoML, one service worker) on a loopback port: answers equal
a direct ONNX Runtime run, concurrent requests are batched, bad input gets a JSON 4xx, every
process of the server runs with its malloc settings, and none ever loads torch."""

from __future__ import annotations

import asyncio
import json
import os
import re
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import psutil
import pytest

from lantern.core.images import decode_image
from service import native
from service.classifier import softmax
from tests.conftest import TINY_CLASSES
from tests.service_fixtures import (
    SERVER_MAX_BATCH_BYTES,
    SERVER_MAX_BATCH_IMAGES,
    SERVER_MAX_UPLOAD_BYTES,
    Server,
    animated_gif,
    encode,
    exif_rotated_jpeg,
    grey16,
    jpeg,
    png,
    png_header_only,
    server_environments,
    solid,
    start_server,
    stop_server,
    truncated,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def lantern_server(tiny_bundle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:  # type: ignore[no-untyped-def]
    """One real `lantern serve` for these tests, serving the tiny bundle."""
    server = start_server(tiny_bundle.tag, tmp_path_factory.mktemp("serve") / "serve.log")
    yield server
    stop_server(server)


def reference(bundle, images: list[bytes]) -> np.ndarray:  # type: ignore[no-untyped-def]
    x = bundle.preprocess.apply_batch([decode_image(d, max_pixels=10**8) for d in images])
    session = ort.InferenceSession(str(bundle.onnx_path), providers=["CPUExecutionProvider"])
    return softmax(session.run(None, {"input": x})[0])


def every_format() -> dict[str, bytes]:
    rgba = solid("RGBA", (30, 20), (10, 200, 40, 128))
    return {
        "jpeg": jpeg((120, 90), seed=1),
        "jpeg-exif-rotated": exif_rotated_jpeg(),
        "jpeg-cmyk": encode(solid("CMYK", (40, 30), (0, 200, 100, 20)), "JPEG"),
        "png-rgba": encode(rgba, "PNG"),
        "png-la": encode(rgba.convert("LA"), "PNG"),
        "png-p": encode(solid("RGB", (40, 30), (5, 90, 200)).convert("P"), "PNG"),
        "png-16bit": encode(grey16(40000), "PNG"),
        "webp": encode(solid("RGB", (40, 30), (120, 60, 30)), "WEBP"),
        "bmp": encode(solid("L", (40, 30), 77), "BMP"),
        "gif-animated": animated_gif((200, 0, 0), (0, 0, 200)),
        "tiff-16bit": encode(grey16(1000), "TIFF"),
        "tiff-cmyk": encode(solid("CMYK", (40, 30), (100, 0, 50, 0)), "TIFF"),
    }


def test_predictions_equal_a_direct_onnx_runtime_run(lantern_server: Server, tiny_bundle) -> None:  # type: ignore[no-untyped-def]
    images = every_format()
    expected = reference(tiny_bundle, list(images.values()))
    with httpx.Client(base_url=lantern_server.url, timeout=30) as client:
        for (name, data), probs in zip(images.items(), expected, strict=True):
            r = client.post("/predict?top_k=3", files={"image": (name, data)})
            assert r.status_code == 200, (name, r.text)
            body = r.json()
            got = {e["class_index"]: e["probability"] for e in body["top_k"]}
            assert len(got) == 3, name
            for index, p in got.items():
                assert p == pytest.approx(float(probs[index]), abs=1e-5), name
            assert body["class_index"] == int(np.argmax(probs)), name
            assert body["model_version"] == tiny_bundle.version
        files = [("images", (name, data)) for name, data in images.items()]
        r = client.post("/predict_batch", files=files[:SERVER_MAX_BATCH_IMAGES])
        assert r.status_code == 200, r.text
        for p, probs in zip(r.json()["predictions"], expected, strict=False):
            assert p["probability"] == pytest.approx(float(probs.max()), abs=1e-5)
        assert len(r.json()["predictions"]) == SERVER_MAX_BATCH_IMAGES


def batch_histogram(metrics: str) -> tuple[float, float]:
    """(images, batches) the model has run, from the service's lantern_batch_size histogram."""
    found = {}
    for suffix in ("sum", "count"):
        m = re.search(rf"^lantern_batch_size_{suffix}(?:\{{[^}}]*\}})? (\S+)$", metrics, re.M)
        assert m, f"no lantern_batch_size_{suffix} in /metrics"
        found[suffix] = float(m.group(1))
    return found["sum"], found["count"]


def test_32_concurrent_requests_all_succeed_and_every_image_is_run_once(
    lantern_server: Server,
) -> None:
    """Whether concurrent requests merge depends on how fast the model is on this machine;
    that they do when they queue behind a busy model is proven without timing in
    tests/test_service_batcher.py. Here: all succeed, each image is run exactly once."""
    images = [jpeg((160, 120), seed=s) for s in range(32)]

    async def burst() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=32)
        async with httpx.AsyncClient(base_url=lantern_server.url, timeout=60, limits=limits) as c:
            return await asyncio.gather(
                *(
                    c.post("/predict", files={"image": (f"{i}.jpg", d)})
                    for i, d in enumerate(images)
                )
            )

    before = batch_histogram(httpx.get(lantern_server.url + "/metrics").text)
    responses = asyncio.run(burst())
    after = batch_histogram(httpx.get(lantern_server.url + "/metrics").text)
    assert [r.status_code for r in responses] == [200] * 32, [
        r.text for r in responses if r.status_code != 200
    ]
    served, batches = after[0] - before[0], after[1] - before[1]
    assert served == 32
    assert 1 <= batches <= served


def test_bad_input_gets_a_json_4xx_and_the_server_keeps_serving(lantern_server: Server) -> None:
    limit = SERVER_MAX_UPLOAD_BYTES
    xml = {"Content-Type": "application/xml"}
    jpeg_type = {"Content-Type": "image/jpeg"}
    cases: list[tuple[str, dict, int]] = [  # type: ignore[type-arg]
        ("empty body", {}, 400),
        ("missing field", {"files": {"picture": ("a.jpg", jpeg())}}, 400),
        ("not an image", {"files": {"image": ("a.jpg", b"GIF89a but not really")}}, 415),
        ("truncated", {"files": {"image": ("t.png", truncated(png((300, 200))))}}, 422),
        ("unknown content type", {"content": b"<xml/>", "headers": xml}, 415),
        ("file over the limit", {"files": {"image": ("big.jpg", b"\xd8" * (limit + 1))}}, 413),
        ("body over the limit", {"content": b"\xd8" * (2 * limit), "headers": jpeg_type}, 413),
        ("bomb", {"files": {"image": ("b.png", png_header_only(30_000, 30_000))}}, 413),
        ("too many pixels", {"files": {"image": ("w.png", png_header_only(5_000, 1_000))}}, 413),
        ("zero-sized", {"files": {"image": ("zero.png", png_header_only(7, 0))}}, 422),
    ]  # fmt: skip
    with httpx.Client(base_url=lantern_server.url, timeout=30) as client:
        for name, kwargs, status in cases:
            r = client.post("/predict", **kwargs)
            assert r.status_code == status, (name, r.status_code, r.text)
            body = r.json()
            assert isinstance(body, dict) and set(body) == {"error"}, (name, body)
            assert len(body["error"]) > 20, (name, body)
        too_many = [("images", (f"{i}.jpg", jpeg())) for i in range(SERVER_MAX_BATCH_IMAGES + 1)]
        r = client.post("/predict_batch", files=too_many)
        assert r.status_code == 413 and "too many" in r.json()["error"]
        # each file within its own limit, the body over LANTERN_MAX_BATCH_BYTES
        size = SERVER_MAX_BATCH_BYTES // 4 + 1
        assert size < limit
        heavy = [("images", (f"{i}.jpg", b"\xd8" * size)) for i in range(4)]
        r = client.post("/predict_batch", files=heavy)
        assert r.status_code == 413, r.text
        assert f"larger than the limit of {SERVER_MAX_BATCH_BYTES:,} bytes" in r.json()["error"]
        assert client.post("/predict", files={"image": ("ok.jpg", jpeg())}).status_code == 200
    # and none of it was a 500: the server's own request counter has no 5xx series
    metrics = httpx.get(lantern_server.url + "/metrics", timeout=10).text
    assert 'bentoml_service_request_total{endpoint="/predict"' in metrics
    # (BentoML pre-creates a zero 500 series for each @bentoml.api route: count, not names.)
    served_5xx = re.findall(r'http_response_code="5\d\d"[^}]*\} ([0-9.e+]+)', metrics)
    assert not any(float(n) for n in served_5xx), "a request got a 5xx"


def test_no_process_of_the_server_loads_torch(lantern_server: Server) -> None:
    root = psutil.Process(lantern_server.process.pid)
    processes = [root, *root.children(recursive=True)]
    maps = {p.pid: Path(f"/proc/{p.pid}/maps").read_text() for p in processes}
    # Not vacuous: the tree holds the arbiter and the service worker, and the worker's
    # memory map shows the ONNX Runtime library it inferred with.
    commands = [" ".join(p.cmdline()) for p in processes]
    assert any("--service-name lantern " in c + " " for c in commands), commands
    assert any("onnxruntime_pybind11_state" in m for m in maps.values())
    for pid, text in maps.items():
        loaded = {line.split()[-1] for line in text.splitlines() if "torch" in line.lower()}
        assert not loaded, f"process {pid} mapped torch: {sorted(loaded)[:3]}"


def test_cpu_by_stage_accrues_per_prediction_and_stays_within_what_the_worker_used(
    lantern_server: Server,
) -> None:
    """Each stage's counter grows with predictions; the stages are parts of the worker's
    CPU (they never add up to more); and the worker's CPU is no more than the kernel says
    its process used over a window that contains it (/proc counts in 10 ms ticks)."""
    from bench.predict import cpu_counters
    from service.metrics import CPU_STAGES

    root = psutil.Process(lantern_server.process.pid)
    processes = [root, *root.children(recursive=True)]
    (worker,) = [p for p in processes if "_bentoml_impl.worker.service" in " ".join(p.cmdline())]
    images = [jpeg((320, 240), seed=s) for s in range(24)]
    with httpx.Client(base_url=lantern_server.url, timeout=60) as client:
        kernel_before = sum(worker.cpu_times()[:2])
        # The window opens at this request's end (the first reading after start only sets
        # a baseline), inside the kernel's window.
        assert client.post("/predict", files={"image": ("0.jpg", images[0])}).status_code == 200
        before = cpu_counters(client.get("/metrics").text)
        for i, data in enumerate(images):
            r = client.post("/predict", files={"image": (f"{i}.jpg", data)})
            assert r.status_code == 200, r.text
        after = cpu_counters(client.get("/metrics").text)
        kernel = sum(worker.cpu_times()[:2]) - kernel_before
    assert "worker" in before and "worker" in after, "no lantern_worker_cpu_seconds_total"
    spent = {name: after[name] - before.get(name, 0.0) for name in after}
    assert set(CPU_STAGES) <= set(spent), spent
    assert all(spent[stage] > 0 for stage in CPU_STAGES), spent
    assert sum(spent[stage] for stage in CPU_STAGES) <= spent["worker"], spent
    assert spent["worker"] <= kernel + 0.03, (spent, kernel)


def test_every_process_of_the_server_runs_with_the_malloc_settings(lantern_server: Server) -> None:
    # glibc reads them once, at the start of a process: they must be in the environment
    # `lantern serve` execs the server with, and reach the worker it forks.
    from lantern.commands.serve import MALLOC_ENV

    environments = server_environments(lantern_server)
    assert len(environments) >= 2  # the arbiter and the service worker
    for pid, environ in environments.items():
        for name, value in MALLOC_ENV.items():
            assert environ.get(name) == os.environ.get(name, value), (pid, name)


def test_the_batch_size_and_thread_settings_reach_the_model(tiny_bundle, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """LANTERN_MAX_BATCH_SIZE caps every model call, however many requests queue;
    LANTERN_ORT_THREADS is the all-cores session's intra-op thread count."""
    server = start_server(
        tiny_bundle.tag,
        tmp_path / "serve.log",
        {"LANTERN_MAX_BATCH_SIZE": "2", "LANTERN_ORT_THREADS": "2"},
    )
    try:
        images = [jpeg((160, 120), seed=s) for s in range(24)]

        async def burst() -> list[httpx.Response]:
            limits = httpx.Limits(max_connections=24)
            async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as c:
                return await asyncio.gather(
                    *(
                        c.post("/predict", files={"image": (f"{i}.jpg", d)})
                        for i, d in enumerate(images)
                    )
                )

        responses = asyncio.run(burst())
        assert [r.status_code for r in responses] == [200] * 24
        metrics = httpx.get(server.url + "/metrics", timeout=10).text
        images_run, batches = batch_histogram(metrics)
        at_most_two = re.search(r'^lantern_batch_size_bucket\{le="2.0"\} (\S+)$', metrics, re.M)
        assert at_most_two, metrics[:2000]
        assert images_run == 24 and batches >= 12
        assert float(at_most_two.group(1)) == batches  # no call above two images
        assert "(asked for auto; intra-op threads 2)" in server.log_text()
    finally:
        stop_server(server)


def test_a_request_that_waits_past_max_latency_is_refused_with_a_503_and_the_server_goes_on(
    tiny_bundle, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """LANTERN_MAX_LATENCY_MS: a request queued longer than that for its model call is
    refused with 503, a readable error and Retry-After (the README's and the OpenAPI
    document's promise), and the refusal leaves the server serving. With batches of one
    image and a 1 ms limit, a /predict_batch of 64 images queues 64 model calls at once:
    the last ones cannot start within 1 ms on any CPU (each waits for dozens of calls
    before it). A lone request, which a free model stream takes at once, still answers.
    """
    server = start_server(
        tiny_bundle.tag,
        tmp_path / "serve.log",
        {
            "LANTERN_MAX_LATENCY_MS": "1",
            "LANTERN_MAX_BATCH_SIZE": "1",
            "LANTERN_MAX_BATCH_IMAGES": "64",
        },
    )
    try:
        files = [("images", (f"{i}.jpg", jpeg((64, 64), seed=i))) for i in range(64)]
        refused = httpx.post(server.url + "/predict_batch", files=files, timeout=60)
        assert refused.status_code == 503, refused.text[:300]
        assert refused.json() == {"error": "the model is overloaded right now; retry in a moment"}
        assert refused.headers["retry-after"] == "1"
        # A lone request starts at once, well inside even 1 ms: the server goes on.
        alone = httpx.post(server.url + "/predict", files={"image": ("a.jpg", jpeg((64, 64)))})
        assert alone.status_code == 200, alone.text
        assert alone.json()["label"] in TINY_CLASSES
    finally:
        stop_server(server)


def test_probes_metrics_and_docs(lantern_server: Server, tiny_bundle) -> None:  # type: ignore[no-untyped-def]
    with httpx.Client(base_url=lantern_server.url, timeout=10) as client:
        assert client.get("/livez").status_code == 200
        assert client.get("/readyz").status_code == 200
        metrics = client.get("/metrics").text
        assert f'version="{tiny_bundle.version}"' in metrics and "lantern_model_info" in metrics
        assert "lantern_batch_size" in metrics and "request_duration_seconds" in metrics
        assert "/predict" in client.get("/docs.json").json()["paths"]
    provider = re.search(r"runs on (\w+ExecutionProvider)", lantern_server.log_text())
    assert provider and provider.group(1) in {"CPUExecutionProvider", "CUDAExecutionProvider"}


# --- kept-alive connections ----------------------------------------------------------------
# A server that closes an idle connection can do so just as the client sends its next request
# on it; the client then gets a connection error for a request it cannot tell was received
# (the soak test met it: httpx's pool had left connections idle for as long as uvicorn's
# default 5 s). So the API's keep-alive must outlast its clients' (httpx and Node.js close
# idle connections after 5 s), which then always close first; and it must stay finite.


def get_on(sock: socket.socket, path: str) -> int:
    """Status of one GET sent on an open connection (reads the whole answer)."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: lantern\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection instead of answering {path}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?im)^content-length:\s*(\d+)", head).group(1))  # type: ignore[union-attr]
    while len(body) < length:
        body += sock.recv(65536)
    return int(head.split()[1])


def connect(server: Server) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=30)


def test_an_idle_connection_outlasts_an_http_clients_5_s_keep_alive(lantern_server: Server) -> None:
    with connect(lantern_server) as sock:
        assert get_on(sock, "/livez") == 200
        closed, _, _ = select.select([sock], [], [], 6.5)  # readable: the server hung up
        assert not closed, "the server closed an idle connection within 6.5 s"
        assert get_on(sock, "/livez") == 200  # the same connection, reused


def test_keep_alive_seconds_sets_how_long_an_idle_connection_stays_open(
    tiny_bundle,  # type: ignore[no-untyped-def]
    tmp_path: Path,
) -> None:
    server = start_server(
        tiny_bundle.tag, tmp_path / "serve.log", {"LANTERN_KEEP_ALIVE_SECONDS": "2"}
    )
    try:
        with connect(server) as sock:
            assert get_on(sock, "/livez") == 200
            idle = time.monotonic()
            closed, _, _ = select.select([sock], [], [], 30)
            waited = time.monotonic() - idle
            assert closed and sock.recv(1) == b"", "the idle connection was not closed"
            # Not before 2 s, and well before uvicorn's own default of 5 s.
            assert 1.5 < waited < 4.5, f"closed after {waited:.1f} s, keep-alive 2 s"
    finally:
        stop_server(server)


# --- an endless upload -----------------------------------------------------------------
# service/uploads.py: "The body is read in chunks and refused as soon as it passes its
# byte limit, so an oversized upload never sits in memory whole." Proved with a client
# that never stops: a chunked body (no Content-Length to refuse up front) sent until the
# server answers, for at most ENDLESS_CAP bytes.

ENDLESS_CAP = 256 * 1024 * 1024
CHUNK = b"\xff" * (256 * 1024)
BOUNDARY = "lantern-endless"


def _send_until_answered(
    server: Server, path: str, content_type: str, preamble: bytes
) -> tuple[int, int, bytes]:
    """(status, bytes of body sent, answer body) for an endless chunked upload to `path`."""

    def chunk(data: bytes) -> bytes:
        return f"{len(data):x}\r\n".encode() + data + b"\r\n"

    sent = 0
    with connect(server) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: lantern\r\nContent-Type: {content_type}\r\n"
            "Transfer-Encoding: chunked\r\n\r\n".encode()
        )
        sock.sendall(chunk(preamble))
        sent += len(preamble)
        answered = False
        while sent < ENDLESS_CAP:
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:
                answered = True
                break
            try:
                sock.sendall(chunk(CHUNK))
            except (BrokenPipeError, ConnectionResetError):
                answered = True  # it answered and hung up while we were still sending
                break
            sent += len(CHUNK)
        assert answered, f"no answer after {sent / 2**20:.0f} MiB: the server read it all"
        data = b""

        def complete() -> bool:  # the head and as much body as it announces
            head, sep, rest = data.partition(b"\r\n\r\n")
            length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
            return bool(sep) and length is not None and len(rest) >= int(length.group(1))

        try:
            while not complete():
                more = sock.recv(65536)
                if not more:
                    break
                data += more
        except ConnectionResetError:
            pass
    head, _, body = data.partition(b"\r\n\r\n")
    assert head, f"the server hung up without an answer after {sent} bytes"
    return int(head.split()[1]), sent, body


def _worker_rss(server: Server) -> int:
    root = psutil.Process(server.process.pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])


@pytest.mark.parametrize(
    ("path", "kind", "limit"),
    [
        ("/predict", "raw", SERVER_MAX_UPLOAD_BYTES),
        ("/predict", "multipart", SERVER_MAX_UPLOAD_BYTES),
        ("/explain", "multipart", SERVER_MAX_BATCH_BYTES),
        # The BentoML-native door, which reads requests with the same code and limits.
        ("/v1/predict", "multipart", SERVER_MAX_UPLOAD_BYTES),
        ("/v1/predict_batch", "multipart", SERVER_MAX_BATCH_BYTES),
        ("/v1/explain", "multipart", SERVER_MAX_BATCH_BYTES),
    ],
)
def test_an_endless_upload_is_refused_near_its_limit_without_being_held(
    lantern_server: Server, path: str, kind: str, limit: int
) -> None:
    field = "image" if path.endswith("/predict") else "images"
    if kind == "raw":
        content_type, preamble = "image/jpeg", b"\xff\xd8"
    else:
        content_type = f"multipart/form-data; boundary={BOUNDARY}"
        preamble = (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{field}"; '
            'filename="endless.jpg"\r\nContent-Type: image/jpeg\r\n\r\n'
        ).encode()
    before = _worker_rss(lantern_server)
    status, sent, body = _send_until_answered(lantern_server, path, content_type, preamble)
    grew = _worker_rss(lantern_server) - before
    assert status == 413, body[:300]
    assert set(json.loads(body)) == {"error"} and "bytes" in json.loads(body)["error"], body[:300]
    # Answered once the limit was passed, give or take what the sockets' buffers hold
    # (several MiB on loopback), and the server did not keep what it read.
    assert sent < limit + 32 * 2**20, f"{sent / 2**20:.0f} MiB sent before the 413"
    assert grew < 64 * 2**20, f"the server's processes grew by {grew / 2**20:.0f} MiB"
    with httpx.Client(base_url=lantern_server.url, timeout=30) as client:
        ok = client.post("/predict", files={"image": ("ok.jpg", jpeg((64, 64)))})
        assert ok.status_code == 200, ok.text


# --- a pickle sent to the BentoML-native door ------------------------------------------


class _Exploit:
    """Unpickling this runs a shell command that creates `marker`: proof of execution."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize(
    "content_type",
    [
        "application/vnd.bentoml+pickle",
        "application/vnd.bentoml+pickle; charset=utf-8",
        "Application/VND.BentoML+Pickle",
    ],
)
def test_whoever_can_reach_the_api_cannot_make_it_unpickle(
    lantern_server: Server, tmp_path: Path, content_type: str
) -> None:
    """BentoML's service-to-service format is pickle (service.native). Sent by an HTTP
    client to any /v1 method, in any spelling of its media type, it is refused with a
    4xx and a readable error, and nothing in it runs."""
    import pickle

    for route in native.ROUTES.values():
        marker = tmp_path / f"ran{route.replace('/', '-')}"
        exploit = _Exploit(marker)
        body = pickle.dumps({"image": exploit, "images": [exploit], "job_id": exploit})
        r = httpx.post(
            lantern_server.url + route,
            content=body,
            headers={"Content-Type": content_type},
            timeout=30,
        )
        assert r.status_code in (400, 415), (route, r.status_code, r.text[:300])
        error = r.json()
        error = error[0] if isinstance(error, list) else error  # BentoML's own 415 body
        assert isinstance(error.get("error"), str) and error["error"], (route, r.text[:300])
        if content_type.islower():  # BentoML's refusal, before Lantern sees the request
            assert r.status_code == 415 and "not allowed" in error["error"], r.text[:300]
        else:  # not BentoML's format: Lantern reads it, and says what it wants instead
            assert set(error) == {"error"}, r.text[:300]
        assert not marker.exists(), f"{route} unpickled the body ({content_type})"
