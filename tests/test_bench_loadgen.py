"""bench.loadgen's closed loop: its steady stretch is the time every user had a request out.

The benchmarks' throughput at a concurrency is the answers per second until the last
request goes out; after that fewer and fewer requests are left (the drain) and a server
with two model streams idles one of them for up to a whole batch. In a closed loop of
`concurrency` users the last request goes out when exactly `requests - concurrency`
answers are in, which is what this checks against a small asyncio server.
"""

from __future__ import annotations

import asyncio

import pytest

from bench.loadgen import Run, closed_loop
from tests.http_stub import read_request


async def against_a_server(requests: int, concurrency: int) -> Run:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await read_request(reader)
                await asyncio.sleep(0.005)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        except asyncio.IncompleteReadError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        return await closed_loop(f"http://127.0.0.1:{port}", [b"jpeg"], concurrency, requests)


def test_the_steady_stretch_ends_when_the_last_request_goes_out() -> None:
    run = asyncio.run(against_a_server(requests=60, concurrency=8))
    assert len(run.latencies_ms) == 60
    assert run.steady_answers == 60 - 8
    assert 0 < run.steady_seconds < run.seconds
    assert run.steady_throughput == run.steady_answers / run.steady_seconds


def test_without_a_steady_stretch_the_throughput_is_all_answers_over_all_the_time() -> None:
    run = asyncio.run(against_a_server(requests=4, concurrency=8))  # every request at once
    assert run.steady_answers == 0
    assert run.steady_throughput == pytest.approx(4 / run.seconds)
