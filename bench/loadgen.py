"""A lean closed-loop HTTP/1.1 load generator for `POST /predict`.

The benchmarks run the client on the same few cores as the service it measures, so every
millisecond the client spends per request is a millisecond the service does not get.
httpx costs about 2.5 ms of CPU per multipart request here (2 vCPU Xeon), a tenth of what
an INT8 ResNet-50 image costs the model; this client pre-encodes each request once
(headers and multipart body as bytes), writes it on a kept-alive connection and reads the
response with a minimal parser, so its own cost per request is a fraction of that. It
checks what it reads: the status code, and (when asked) the answer's `precision`.

Each user is one connection, sending its next request when the previous answer arrived
(closed loop), as many users as the concurrency.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass
class Answer:
    status: int
    body: bytes


def multipart_request(host: str, path: str, field: str, filename: str, data: bytes) -> bytes:
    """The bytes of one HTTP/1.1 multipart POST carrying `data` as file field `field`."""
    boundary = uuid.uuid4().hex
    body = (
        (
            f"--{boundary}\r\n"
            f'Content-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    head = (
        f"POST {path} HTTP/1.1\r\n"
        f"Host: {host}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "\r\n"
    ).encode()
    return head + body


def upload_requests(url: str, path: str, images: list[bytes]) -> tuple[str, int, list[bytes]]:
    """(host, port, the bytes of one multipart POST to `path` per image) for `url`."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    encoded = [
        multipart_request(f"{host}:{port}", path, "image", f"{i}.jpg", data)
        for i, data in enumerate(images)
    ]
    return host, port, encoded


async def read_answer(reader: asyncio.StreamReader) -> Answer:
    """One HTTP/1.1 response: Content-Length or chunked bodies."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        return Answer(status, await reader.readexactly(int(headers["content-length"])))
    if headers.get("transfer-encoding", "").lower() == "chunked":
        chunks = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            chunk = await reader.readexactly(size + 2)  # the data and its CRLF
            if size == 0:
                return Answer(status, b"".join(chunks))
            chunks.append(chunk[:-2])
    raise RuntimeError(f"an answer without a length: {head!r}")


@dataclass
class Run:
    seconds: float  # from the first request out to the last answer in
    latencies_ms: list[float]
    steady_answers: int  # answers in before the last request went out ...
    steady_seconds: float  # ... and the time until then

    @property
    def steady_throughput(self) -> float:
        """Answers per second while every user had a request out: the closed loop at its
        concurrency, without the drain at the end, where fewer and fewer requests are left
        and the server idles part of its cores (a whole batch's time of one model stream
        on a slow CPU). All requests over all the time when there was no such stretch."""
        if self.steady_answers and self.steady_seconds > 0:
            return self.steady_answers / self.steady_seconds
        return len(self.latencies_ms) / self.seconds


async def closed_loop(
    url: str,
    images: list[bytes],
    concurrency: int,
    requests: int,
    precision: str = "",
    path: str = "/predict",
) -> Run:
    """`requests` POSTs of `images` (cycled) by `concurrency` users. Raises RuntimeError
    on any answer but 200, or on an answer that names another precision than
    `precision` (when given)."""
    host, port, encoded = upload_requests(url, path, images)
    latencies: list[float] = []
    next_index = 0
    steady: tuple[int, float] = (0, 0.0)

    async def user() -> None:
        nonlocal next_index, steady
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while next_index < requests:
                i = next_index
                next_index += 1
                t0 = time.perf_counter()
                if next_index == requests:  # the last one: the drain starts
                    steady = (len(latencies), t0 - start)
                writer.write(encoded[i % len(encoded)])
                answer = await read_answer(reader)
                latencies.append((time.perf_counter() - t0) * 1000)
                if answer.status != 200:
                    raise RuntimeError(f"{path} answered {answer.status}: {answer.body[:300]!r}")
                if precision and json.loads(answer.body)["precision"] != precision:
                    raise RuntimeError(f"asked for {precision}, served {answer.body[:300]!r}")
        finally:
            writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(user() for _ in range(concurrency)))
    return Run(time.perf_counter() - start, latencies, *steady)
