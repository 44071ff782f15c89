"""bench.loadgen's closed loop: its steady window leaves out the start and the drain.

The benchmarks' throughput at a concurrency is the answers per second from the
`concurrency`-th answer (every user has had one; before it, the server got every user's
first upload at once) to the `requests - concurrency`-th (then the last request goes out,
and after it fewer and fewer requests are left: the drain). Checked against small asyncio
servers: one that answers every request alike, and one whose first answers are slow.
"""

from __future__ import annotations

import asyncio

import pytest

from bench.loadgen import Run, closed_loop
from tests.http_stub import read_request


async def against_a_server(
    requests: int, concurrency: int, first_s: float = 0.005, then_s: float = 0.005
) -> Run:
    """A closed loop against a server that answers each connection's first request after
    `first_s` and every later one after `then_s`."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        delay = first_s
        try:
            while True:
                await read_request(reader)
                await asyncio.sleep(delay)
                delay = then_s
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        except asyncio.IncompleteReadError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        return await closed_loop(f"http://127.0.0.1:{port}", [b"jpeg"], concurrency, requests)


def test_the_steady_window_runs_from_the_concurrencyth_answer_to_the_last_request_out() -> None:
    run = asyncio.run(against_a_server(requests=60, concurrency=8))
    assert len(run.latencies_ms) == len(run.answered_s) == 60
    assert run.answered_s == sorted(run.answered_s)
    window = run.steady_window
    assert window is not None
    answers, seconds = window
    assert answers == 60 - 2 * 8
    assert seconds == run.answered_s[60 - 8 - 1] - run.answered_s[8 - 1]
    assert 0 < seconds < run.seconds
    assert run.steady_throughput == answers / seconds
    assert run.from_start_throughput == (60 - 8) / run.answered_s[60 - 8 - 1]


def test_a_slow_start_is_left_out_of_the_steady_window() -> None:
    # Every connection's first answer takes 0.5 s, then each takes 0.02 s: 8 users at
    # 0.02 s per request are 400 answers/s in steady state (less if the sleeps overrun).
    run = asyncio.run(against_a_server(requests=80, concurrency=8, first_s=0.5, then_s=0.02))
    assert 200 < run.steady_throughput <= 400 * 1.05
    # From the start, the 0.5 s counts: 72 answers in 0.5 + 8 * 0.02 s, ~110/s.
    assert run.from_start_throughput < run.steady_throughput / 2


def test_without_a_steady_window_the_throughput_is_all_answers_over_all_the_time() -> None:
    run = asyncio.run(against_a_server(requests=16, concurrency=8))  # no more than 2 x 8
    assert run.steady_window is None
    assert run.steady_throughput == pytest.approx(16 / run.seconds)
    run = asyncio.run(against_a_server(requests=4, concurrency=8))  # every request at once
    assert run.steady_window is None
    assert run.steady_throughput == pytest.approx(4 / run.seconds)
    assert run.from_start_throughput == pytest.approx(4 / run.seconds)
