"""The BentoML service `Lantern`: the HTTP API and the model session, in one process.

    bentoml serve service.service:Lantern        (what `lantern serve` runs)

`Lantern` owns the HTTP surface (the FastAPI app in `service.api`, mounted at /) and the
model: it reads and validates uploads, decodes and preprocesses them in worker threads
with the bundle's own spec, hands the float arrays to a `MicroBatcher` (service.batcher)
that runs whatever is queued as one model call the moment the model is free (ONNX Runtime,
or OpenVINO with LANTERN_RUNTIME=openvino: service.classifier), and
turns probabilities into top-k answers. One process: no hop between an API and a model
process, and no second process competing for the cores. Batch sizes and queue waits go
to /metrics (service.metrics).

It never imports torch: the service image does not carry it.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import bentoml
import numpy as np
from PIL import Image

from lantern.core.bundle import Bundle, describe_int8, describe_openvino_int8, load_bundle
from lantern.core.images import decode_image
from lantern.core.logs import configure_logging
from lantern.core.settings import Settings, get_settings
from service import classifier, native
from service.api import BatchPrediction, Prediction, app
from service.batcher import MicroBatcher
from service.error_bodies import ErrorBodies
from service.explanations import Explanations
from service.gateway import (
    ApiKeyMiddleware,
    RequestIdMiddleware,
    install_templated_metrics,
    tracing_config,
)
from service.memory import (
    ArenaShrinker,
    MallocTrimmer,
    decode_threads,
    patch_timeout_middleware,
)
from service.metrics import (
    WorkerCpu,
    declare_metrics,
    record_batch,
    record_cpu,
    record_model_info,
)
from service.openapi import OpenAPIDocument
from service.status_api import ExplainProbe
from service.uploads import Upload

log = logging.getLogger("lantern.service")


def _in_bentoml_server() -> bool:
    """Whether this process is one of BentoML's (`bentoml serve`, or a server worker that
    `_bentoml_impl.worker.service` started), rather than e.g. a test importing the module."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    name = getattr(spec, "name", "") or ""
    return name.startswith(("bentoml", "_bentoml_impl")) or Path(sys.argv[0]).name == "bentoml"


def _adopt_logging() -> None:
    """Lantern's one log format in BentoML's processes (lantern.core.logs).

    A server worker applies BentoML's logging config (its own format, on stdout) before it
    imports this module, so replacing it here, at import, covers every line after that;
    Lantern.__init__ does it again in case anything re-applied BentoML's config since.
    Root stays at WARNING as BentoML had it; Lantern's, BentoML's (the access log) and
    RQ's loggers log INFO.
    """
    if _in_bentoml_server():
        configure_logging(level=logging.INFO, root_level=logging.WARNING)


def _stop_with_the_arbiter() -> None:
    """In a BentoML server worker: stop when the `bentoml serve` process that started it dies.

    BentoML starts its workers in sessions of their own, each holding the listening
    socket. An arbiter killed outright (SIGKILL: the OOM killer, a supervisor's last
    resort) left its worker running and serving on the port, adopted by init, so the
    restarted server could not bind it and `lantern up` restarted the API in a loop
    ("Address already in use") until it gave up. Linux's parent-death signal sends the
    worker SIGTERM, its ordinary graceful stop, instead. The arbiter spawns its workers
    from its main thread, which lives as long as it does.
    """
    if not sys.platform.startswith("linux"):
        return
    main = sys.modules.get("__main__")
    if getattr(getattr(main, "__spec__", None), "name", "") != "_bentoml_impl.worker.service":
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1  # <linux/prctl.h>
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0) != 0:
        log.warning(
            "could not ask to be stopped with the server (prctl: errno %d)", ctypes.get_errno()
        )


_adopt_logging()
_stop_with_the_arbiter()

# BentoML's per-request timeout timer otherwise keeps every request alive for 300 s.
patch_timeout_middleware()


@bentoml.asgi_app(app, path="/")
@bentoml.service(
    name="lantern",
    workers=1,  # one ONNX Runtime session already uses every core
    traffic={"timeout": 300},
    # No OpenTelemetry span per request unless a trace exporter is configured.
    tracing=tracing_config(),
)
class Lantern:
    """Lantern: image classification from the registered ONNX model."""

    def __init__(self) -> None:
        _adopt_logging()
        _show_lantern_logs()
        # The settings are read here, when BentoML starts the service, not at import.
        self.settings: Settings = get_settings()
        # `lantern serve` pins LANTERN_MODEL to a concrete version before starting the
        # server, so every server worker loads the same bundle. (A Bento carries the
        # model through bentofile.yaml's `models:`.)
        self.bundle: Bundle = load_bundle(self.settings.model)
        self.spec = self.bundle.preprocess
        self.class_names = self.bundle.class_names
        self.trimmer = MallocTrimmer()
        # Decoding is CPU-bound: more threads than cores only hold more decoded images
        # (and glibc arenas) in memory at once, not finish sooner.
        self.decode_limiter = anyio.CapacityLimiter(decode_threads())
        # The fastest graph the bundle and LANTERN_PRECISION allow (INT8 on a CPU when the
        # bundle has one that passed its gate at export; BENCHMARKS.md "INT8").
        # LANTERN_RUNTIME: ONNX Runtime, or OpenVINO (CPU only) on the same graphs.
        self.runtime: str = self.settings.runtime
        self.session, self.precision = classifier.open_model(
            self.bundle,
            precision=self.settings.precision,
            provider=self.settings.ort_provider,
            threads=self.settings.ort_threads,
            runtime=self.runtime,
        )
        self.provider: str = self.session.get_providers()[0]
        # On the CPU, several batches at once, each on a single-threaded session of the
        # same graph (service.batcher explains why); `session` keeps every core for a lone
        # request. One more copy of the weights in memory (25 MB for an INT8 ResNet-50).
        self.streams = classifier.model_streams(self.settings.model_streams, self.provider)
        self.stream_session = (
            classifier.create_stream_session(
                classifier.graph_path(self.bundle, self.precision),
                streams=self.streams,
                runtime=self.runtime,
            )
            if self.streams > 1
            else None
        )
        # Each ONNX Runtime session's CPU arena shrinks now and then (service.memory).
        on_ort = self.runtime == classifier.ONNXRUNTIME
        self.shrinker = ArenaShrinker() if on_ort else None
        self.stream_shrinker = ArenaShrinker() if on_ort and self.stream_session else None
        size = self.spec.crop_size
        warm_up = np.zeros((1, 3, size, size), np.float32)
        self._probabilities(self.session, self.shrinker, warm_up, metered=False)
        if self.stream_session is not None:
            self._probabilities(self.stream_session, self.stream_shrinker, warm_up, metered=False)
        log.info(
            "model %s loaded on %s (runtime %s), precision %s (LANTERN_PRECISION=%s; "
            "INT8 graph: %s); %d model stream(s)",
            self.bundle.tag,
            self.provider,
            self.runtime,
            self.precision,
            self.settings.precision,
            describe_int8(self.bundle.int8)
            + (
                f"; under OpenVINO: {describe_openvino_int8(self.bundle.int8)}"
                if self.runtime == classifier.OPENVINO
                else ""
            ),
            self.streams,
        )
        self.batcher = MicroBatcher(
            self.stream_probabilities if self.stream_session is not None else self.probabilities,
            max_batch_size=self.settings.max_batch_size,
            max_queue_wait_s=self.settings.max_latency_ms / 1000,
            observe=record_batch,
            streams=self.streams,
            run_alone=self.probabilities if self.stream_session is not None else None,
        )
        self.explanations = Explanations(self.settings, self.bundle)
        self.explain_probe = ExplainProbe(self.settings)
        record_model_info(self.bundle, self.precision, self.runtime)
        declare_metrics()
        self.worker_cpu = WorkerCpu()
        app.state.lantern = self  # what the routes' `CurrentService` dependency hands them

    async def __is_ready__(self) -> bool:
        return self.session is not None

    def __metrics__(self, content: str) -> str:
        """BentoML's /metrics hook: append the explanation side, read from Redis now."""
        return content + self.explain_probe.metrics_text()

    @bentoml.on_shutdown
    async def close_batcher(self) -> None:
        await self.batcher.aclose()

    async def predict_uploads(self, uploads: list[Upload], k: int) -> list[dict[str, Any]]:
        """Top-k predictions for each upload, in order. Raises InputError for a bad one.

        Raises service.batcher.Overloaded when the model queue is too long.
        """
        try:
            batch = await anyio.to_thread.run_sync(
                self.preprocess_uploads, uploads, limiter=self.decode_limiter
            )
            probabilities = await self.batcher.submit(batch)
            return [self.answer(row, k) for row in probabilities]
        finally:  # on the event loop's thread: what it and the worker spent until now
            self.worker_cpu.record()

    # --- the BentoML-native door (service.native): bentoml.SyncHTTPClient, bentoml.depends.
    # The same operations as the FastAPI routes, on routes of their own under /v1.

    @bentoml.api(route=native.ROUTES["predict"], input_spec=native.PredictInput)
    async def predict(self, image: Path, top_k: int = 5, *, ctx: bentoml.Context) -> Prediction:
        """Classify one image: the most probable class, the top-k ranking, the model
        version and precision. Errors are 4xx/503 with a JSON body {"error": "..."}."""
        return await native.predict(self, ctx, image, top_k)

    @bentoml.api(route=native.ROUTES["predict_batch"], input_spec=native.PredictBatchInput)
    async def predict_batch(
        self, images: list[Path], top_k: int = 5, *, ctx: bentoml.Context
    ) -> BatchPrediction:
        """Classify several images: one prediction per image, in order."""
        return await native.predict_batch(self, ctx, images, top_k)

    @bentoml.api(route=native.ROUTES["explain"], input_spec=native.ExplainInput)
    async def explain(
        self,
        images: list[Path],
        methods: str | None = None,
        targets: str | None = None,
        layer: str | None = None,
        activation_layer: str | None = None,
        model: str | None = None,
        force: bool = False,
        faithfulness: bool = False,
        compare_top: int | None = None,
        *,
        ctx: bentoml.Context,
    ) -> dict[str, Any]:
        """Queue an explanation job (as POST /explain): {job_id, status, status_url,
        cached}; poll job_status(job_id=...) for progress and the manifest."""
        options = {
            "methods": methods,
            "targets": targets,
            "layer": layer,
            "activation_layer": activation_layer,
            "model": model,
            "force": force,
            "faithfulness": faithfulness,
            "compare_top": compare_top,
        }
        return await native.explain(self, ctx, images, options)

    @bentoml.api(route=native.ROUTES["job_status"], input_spec=native.JobStatusInput)
    async def job_status(self, job_id: str, *, ctx: bentoml.Context) -> dict[str, Any]:
        """Status, progress, readable error and (when finished) the manifest of a job."""
        return await native.job_status(self, ctx, job_id)

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        """Class probabilities (N, classes) for preprocessed images (N, 3, H, W), on the
        session that uses every core."""
        return self._probabilities(self.session, self.shrinker, batch)

    def stream_probabilities(self, batch: np.ndarray) -> np.ndarray:
        """The same, on the single-threaded session that the model streams share."""
        assert self.stream_session is not None
        return self._probabilities(self.stream_session, self.stream_shrinker, batch)

    def _probabilities(
        self,
        session: Any,
        shrinker: ArenaShrinker | None,
        batch: np.ndarray,
        *,
        metered: bool = True,
    ) -> np.ndarray:
        run_options = shrinker.run_options() if shrinker is not None else None
        started = time.thread_time()
        logits = classifier.run(session, batch, run_options)
        if metered:  # the warm-up at start is not a prediction's cost
            record_cpu("model", time.thread_time() - started)
        probabilities = classifier.softmax(logits)
        self.trimmer.maybe_trim()  # between batches: hand freed heap memory back to the OS
        return probabilities

    def preprocess_uploads(self, uploads: list[Upload]) -> np.ndarray:
        started = time.thread_time()
        try:
            images = [self.decode(u) for u in uploads]
        finally:  # a bad upload's decoding cost CPU too
            decoded = time.thread_time()
            record_cpu("decode", decoded - started)
        batch = self.spec.apply_batch(images)
        record_cpu("preprocess", time.thread_time() - decoded)
        return batch

    def decode(self, upload: Upload) -> Image.Image:
        # Decoded no larger than the resize needs (large JPEGs at reduced scale).
        return decode_image(
            upload.data,
            max_pixels=self.settings.max_pixels,
            name=upload.name,
            reduce_for=self.spec.resize_size,
        )

    def answer(self, probabilities: np.ndarray, k: int) -> dict[str, Any]:
        top = classifier.top_k(probabilities, k)
        ranked = [
            {"label": self.class_names[i], "class_index": i, "probability": p}
            for i, p in zip(top.class_indices, top.probabilities, strict=True)
        ]
        return {
            **ranked[0],
            "top_k": ranked,
            "model_version": self.bundle.version,
            "precision": self.precision,
            "demo": self.bundle.demo,
        }


# Request metrics by route template, not raw path; API keys in front of every route,
# BentoML's /metrics and /docs.json included (service.gateway explains the order).
install_templated_metrics()
# First in the list is outermost: keys are checked before any other Lantern middleware
# (one that serves a route itself, like /docs.json, included).
Lantern.middlewares.insert(0, (ApiKeyMiddleware, {}))  # type: ignore[attr-defined]
# Outside the keys: a refused request has an id too, and its 401 carries it.
Lantern.middlewares.insert(0, (RequestIdMiddleware, {}))  # type: ignore[attr-defined]


# /docs.json: Lantern's own OpenAPI document instead of BentoML's template (service.openapi).
Lantern.add_asgi_middleware(OpenAPIDocument, fastapi_app=app)  # type: ignore[attr-defined]
# The framework's bare 404/405 answers get the same {"error": ...} body as every other error.
Lantern.add_asgi_middleware(ErrorBodies)  # type: ignore[attr-defined]


def _show_lantern_logs() -> None:
    """Let INFO records of the `lantern.*` loggers through in a BentoML worker.

    BentoML's server logging config sets the root logger to WARNING and disables loggers
    that existed before it ran (ours are created at import); the provider line matters.
    """
    for name in list(logging.root.manager.loggerDict):
        if name == "lantern" or name.startswith("lantern."):
            logging.getLogger(name).disabled = False
    logging.getLogger("lantern").setLevel(logging.INFO)
