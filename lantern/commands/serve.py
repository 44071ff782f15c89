"""lantern serve: run the prediction API (`bentoml serve service.service:Lantern`)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

HELP = "Serve predictions over HTTP from the registered ONNX model (BentoML, no torch)."

SERVICE = "service.service:Lantern"
# glibc malloc, for a server that decodes photos in many threads (service/memory.py,
# BENCHMARKS.md "Memory"): threads share two arenas instead of up to eight per core that
# each keep their freed memory, and blocks of 1 MiB and more (decoded images, ONNX Runtime
# activations) are always their own mappings, returned to the OS when freed, instead of
# heap memory once glibc's adaptive threshold has risen. Fixing that threshold also fixes
# the trim threshold at its 128 KiB default, and then freeing each preprocessed image
# (600 KB) handed the top of the heap back to the OS, to be page-faulted in again for the
# next one (decoding and preprocessing took 2.8 instead of 1.6 ms per image); the heap
# keeps up to 32 MiB free instead, and service.memory.MallocTrimmer still hands free
# memory back every couple of seconds. The environment overrides these.
MALLOC_ENV = {
    "MALLOC_ARENA_MAX": "2",
    "MALLOC_MMAP_THRESHOLD_": "1048576",
    "MALLOC_TRIM_THRESHOLD_": "33554432",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: all)")
    p.add_argument("--port", type=int, default=3000, help="port to listen on")
    p.add_argument(
        "--model",
        default=None,
        help="model tag or alias to serve (default: the LANTERN_MODEL setting)",
    )


def run(args: argparse.Namespace) -> int:
    from lantern.core.bundle import load_bundle
    from lantern.core.settings import get_settings

    # Pin "latest" to a concrete version here, once: every server worker then loads the
    # same bundle even if a new version is registered while they start.
    settings = get_settings()
    bundle = load_bundle(args.model or settings.model)
    from service.classifier import OPENVINO, check_runtime, graph_path, openvino_graph_path

    # What the server would refuse as it starts, refused now in one line: a runtime that
    # is not installed or cannot do what is asked, an explicit precision the bundle lacks.
    check_runtime(settings.runtime, precision=settings.precision, provider=settings.ort_provider)
    if settings.precision != "auto":
        check_graph = openvino_graph_path if settings.runtime == OPENVINO else graph_path
        check_graph(bundle, settings.precision)
    env = {**os.environ, "LANTERN_MODEL": bundle.tag, "BENTOML_DO_NOT_TRACK": "true"}
    for name, value in MALLOC_ENV.items():  # glibc reads these when the server starts
        env.setdefault(name, value)
    command = [
        sys.executable, "-m", "bentoml", "serve", SERVICE,
        "--host", args.host, "--port", str(args.port),
        "--timeout-keep-alive", str(settings.keep_alive_seconds),
    ]  # fmt: skip
    # A log line (LANTERN_LOG_FORMAT), like every other line the server writes.
    logging.getLogger("lantern.serve").info(
        "serving %s on http://%s:%d", bundle.tag, args.host, args.port
    )
    # exec, not a child: signals from a terminal, docker or a test reach the server directly.
    os.execvpe(command[0], command, env)
    return 0  # not reached
