"""Shared by the service tests: generated images (every format and mode the service accepts,
and the broken ones it must refuse) and a real `lantern serve` process."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from tests.conftest import free_port

RED = (220, 30, 30)


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **options)
    return buf.getvalue()


def solid(mode: str, size: tuple[int, int], colour: object) -> Image.Image:
    return Image.new(mode, size, colour)  # type: ignore[arg-type]


def photo(size: tuple[int, int] = (96, 72), seed: int = 0) -> Image.Image:
    """A smooth random RGB picture (compresses like a photo)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)


def jpeg(size: tuple[int, int] = (96, 72), seed: int = 0) -> bytes:
    return encode(photo(size, seed), "JPEG", quality=92)


def png(size: tuple[int, int] = (96, 72), seed: int = 0) -> bytes:
    return encode(photo(size, seed), "PNG")


def grey16(value: int, size: tuple[int, int] = (8, 6)) -> Image.Image:
    return Image.fromarray(np.full(size[::-1], value, dtype=np.uint16), mode="I;16")


def animated_gif(first: tuple[int, int, int], second: tuple[int, int, int]) -> bytes:
    frames = [solid("RGB", (16, 12), first), solid("RGB", (16, 12), second)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)


def exif_rotated_jpeg() -> bytes:
    """A 40x20 JPEG, red on the left half, blue on the right, with EXIF orientation 6
    ("rotate 90° clockwise to view"): shown upright it is 20x40, red on top."""
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste(RED, (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(image, "JPEG", quality=95, exif=exif.tobytes())


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height (e.g. a decompression bomb, or zero),
    with a tiny IDAT: Pillow reads the size without decoding any pixel."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )


def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


# --- a real `lantern serve` ---------------------------------------------------------------


# Small limits keep the oversized-upload tests cheap; the code path is the same.
SERVER_MAX_UPLOAD_BYTES = 1_000_000
SERVER_MAX_PIXELS = 4_000_000
SERVER_MAX_BATCH_IMAGES = 8
SERVER_MAX_BATCH_BYTES = 3_000_000  # /predict_batch and /explain bodies: three full images


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def start_server(tag: str, log: Path, extra_env: dict[str, str] | None = None) -> Server:
    """`lantern serve` on a free loopback port, returned once /readyz answers 200."""
    port = free_port()
    # Each server gets a BentoML home of its own that shares the session's model store:
    # BentoML keeps its Prometheus multiprocess files under the home, and a second server
    # on the same home would clear the first one's metrics at start.
    session_home = Path(os.environ["BENTOML_HOME"])
    (session_home / "models").mkdir(parents=True, exist_ok=True)
    home = log.parent / f"bentoml-home-{port}"
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "models").exists():
        (home / "models").symlink_to(session_home / "models", target_is_directory=True)
    env = {
        **os.environ,
        "BENTOML_HOME": str(home),
        "LANTERN_MODEL": tag,
        "LANTERN_MAX_UPLOAD_BYTES": str(SERVER_MAX_UPLOAD_BYTES),
        "LANTERN_MAX_PIXELS": str(SERVER_MAX_PIXELS),
        "LANTERN_MAX_BATCH_IMAGES": str(SERVER_MAX_BATCH_IMAGES),
        "LANTERN_MAX_BATCH_BYTES": str(SERVER_MAX_BATCH_BYTES),
        "LANTERN_ORT_THREADS": "1",  # two cores, shared with the test process
        **(extra_env or {}),
    }
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "lantern.cli",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = Server(url=f"http://127.0.0.1:{port}", process=process, log=log)
    deadline = time.monotonic() + 90
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"lantern serve exited early:\n{server.log_text()[-3000:]}")
        try:
            if httpx.get(server.url + "/readyz", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            stop_server(server)
            raise RuntimeError(f"lantern serve not ready in 90 s:\n{server.log_text()[-3000:]}")
        time.sleep(0.25)


def stop_server(server: Server) -> None:
    if server.process.poll() is None:
        server.process.terminate()
        try:
            server.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait(timeout=10)


def server_environments(server: Server) -> dict[int, dict[str, str]]:
    """The environment of every process of a running `lantern serve` (the BentoML
    arbiter and its workers), by pid, read from /proc."""
    import psutil

    root = psutil.Process(server.process.pid)
    environments = {}
    for process in [root, *root.children(recursive=True)]:
        raw = Path(f"/proc/{process.pid}/environ").read_bytes().split(b"\0")
        environments[process.pid] = dict(
            item.decode().split("=", 1) for item in raw if b"=" in item
        )
    return environments
