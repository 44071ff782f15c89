"""The soak's load: one kept-alive connection per user, and every request accounted for.

A request whose connection fails counts as an error (with the soak going on, on a new
connection) instead of ending the soak without its memory figures, and the users keep
`concurrency` requests at the server. The server here is a small asyncio HTTP/1.1 server
that answers 200, but hangs up without an answer on every fifth request it reads.
"""

from __future__ import annotations

import asyncio

from bench.soak import Sample, soak
from tests.http_stub import read_request


async def serve_and_soak(requests: int, concurrency: int) -> tuple[int, int, list[int], int]:
    """(errors, requests read by the server, samples' done counts, most requests the
    server had open at once)."""
    read = 0
    open_now = most = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal read, open_now, most
        try:
            while True:
                await read_request(reader)
                read += 1
                open_now += 1
                most = max(most, open_now)
                await asyncio.sleep(0.01)  # every user's request arrives while one waits
                open_now -= 1
                if read % 5 == 0:
                    writer.close()  # no answer: the client must count it, reconnect, go on
                    return
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        except asyncio.IncompleteReadError:
            pass  # the client closed this connection
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        _, errors, samples = await soak(
            f"http://127.0.0.1:{port}",
            [b"\xff\xd8 not really a jpeg"],
            requests=requests,
            concurrency=concurrency,
            checkpoints=[requests // 2],
            sample=lambda done, seconds: Sample(done, seconds, {}),
        )
    return errors, read, [s.done for s in samples], most


def test_every_request_is_answered_or_counted_and_the_soak_goes_on() -> None:
    errors, read, done, most = asyncio.run(serve_and_soak(requests=50, concurrency=4))
    assert read == 50  # each request sent once, none lost with its connection
    assert errors == 10  # the fifth, tenth, ... request got no answer
    assert done == [0, 25, 50]
    assert most == 4  # all four users had a request at the server at once
