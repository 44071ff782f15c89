"""The BentoML services: `Lantern` (the HTTP API) in front of `LanternModel` (ONNX Runtime).

    bentoml serve service.service:Lantern        (what `lantern serve` runs)

`LanternModel` holds the ONNX Runtime session and exposes one batchable method, so
BentoML's adaptive batching merges concurrent requests into one `session.run`. `Lantern`
owns the HTTP surface (the FastAPI app in `service.api`, mounted at /): it reads and
validates uploads, decodes and preprocesses them with the bundle's own spec, sends the
float batch to `LanternModel`, and turns probabilities into top-k answers. Under
`bentoml serve` the two run as separate processes joined by a Unix socket; in-process
(tests, `Lantern()` called directly) the dependency is a plain local instance.

Neither imports torch: the service image does not carry it.
"""

from __future__ import annotations

import logging
from typing import Any

import anyio
import bentoml
import numpy as np
from PIL import Image

from lantern.settings import Settings, get_settings
from models.bundle import Bundle, load_bundle
from service import classifier
from service.api import app
from service.explanations import Explanations
from service.images import decode_image
from service.uploads import Upload

log = logging.getLogger("lantern.service")

_settings = get_settings()
CONNECTION_ATTEMPTS = 4


@bentoml.service(
    name="lantern-model",
    workers=1,  # one ONNX Runtime session already uses every core
    traffic={"timeout": 300},
)
class LanternModel:
    """The registered ONNX model, answering batches of preprocessed images."""

    model = bentoml.models.BentoModel(_settings.model)

    def __init__(self) -> None:
        _show_lantern_logs()
        settings = get_settings()
        self.bundle: Bundle = load_bundle(str(self.model.tag))
        self.session = classifier.create_session(
            self.bundle.onnx_path, provider=settings.ort_provider, threads=settings.ort_threads
        )
        self.provider: str = self.session.get_providers()[0]
        size = self.bundle.preprocess.crop_size
        classifier.run(self.session, np.zeros((1, 3, size, size), np.float32))  # warm-up
        log.info("model %s loaded on %s", self.bundle.tag, self.provider)

    def __is_ready__(self) -> bool:
        return self.session is not None

    @bentoml.api(
        batchable=True,
        max_batch_size=_settings.max_batch_size,
        max_latency_ms=_settings.max_latency_ms,
    )
    async def classify(self, batch: np.ndarray) -> np.ndarray:
        """Class probabilities (N, classes) for preprocessed images (N, 3, H, W)."""
        logits = await anyio.to_thread.run_sync(classifier.run, self.session, batch)
        return classifier.softmax(logits)

    @bentoml.api
    def info(self) -> dict[str, Any]:
        """Which model version this process serves, and on which execution provider."""
        return {"tag": self.bundle.tag, "provider": self.provider}


@bentoml.asgi_app(app, path="/")
@bentoml.service(
    name="lantern",
    workers=1,
    traffic={"timeout": 300},
)
class Lantern:
    """Lantern: image classification from the registered ONNX model."""

    model_service = bentoml.depends(LanternModel)

    def __init__(self) -> None:
        _show_lantern_logs()
        self.settings: Settings = get_settings()
        # `lantern serve` pins LANTERN_MODEL to a concrete version before starting the
        # server, so this process and LanternModel resolve the same bundle.
        self.bundle: Bundle = load_bundle(self.settings.model)
        self.spec = self.bundle.preprocess
        self.class_names = self.bundle.class_names
        self.explanations = Explanations(self.settings, self.bundle)
        _record_model_info(self.bundle)

    async def __is_ready__(self) -> bool:
        # BentoML's readiness probe also asks LanternModel, whose __init__ loads the session.
        return self.bundle is not None

    async def predict_uploads(self, uploads: list[Upload], k: int) -> list[dict[str, Any]]:
        """Top-k predictions for each upload, in order. Raises InputError for a bad one."""
        batch = await anyio.to_thread.run_sync(self.preprocess_uploads, uploads)
        probabilities = await self.classify(batch)
        return [self.answer(row, k) for row in np.asarray(probabilities)]

    async def classify(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities from LanternModel, retried when a pooled connection was stale.

        BentoML's client keeps idle connections to the model process for longer than that
        process's server keeps them open (uvicorn closes after 5 s), so the first calls
        after a quiet spell can hit a closed socket. Classification is idempotent.
        """
        from aiohttp import ClientConnectionError

        for attempt in range(1, CONNECTION_ATTEMPTS + 1):
            try:
                return await self.model_service.classify(batch)
            except ClientConnectionError as e:
                if attempt == CONNECTION_ATTEMPTS:
                    raise
                log.info("model service connection failed (%s); retrying", e)
        raise AssertionError("unreachable")

    def preprocess_uploads(self, uploads: list[Upload]) -> np.ndarray:
        images = [self.decode(u) for u in uploads]
        return self.spec.apply_batch(images)

    def decode(self, upload: Upload) -> Image.Image:
        return decode_image(upload.data, max_pixels=self.settings.max_pixels, name=upload.name)

    def answer(self, probabilities: np.ndarray, k: int) -> dict[str, Any]:
        top = classifier.top_k(probabilities, k)
        ranked = [
            {"label": self.class_names[i], "class_index": i, "probability": p}
            for i, p in zip(top.class_indices, top.probabilities, strict=True)
        ]
        return {**ranked[0], "top_k": ranked, "model_version": self.bundle.version}


_model_info_gauge: Any = None


def _record_model_info(bundle: Bundle) -> None:
    """Expose the served model version on /metrics as lantern_model_info{model,version} 1."""
    global _model_info_gauge
    # Imported here, after BentoML has set PROMETHEUS_MULTIPROC_DIR for this worker.
    import prometheus_client

    if _model_info_gauge is None:
        _model_info_gauge = prometheus_client.Gauge(
            "lantern_model_info",
            "The model version this Lantern API process serves (value is always 1).",
            labelnames=["model", "version", "architecture"],
            multiprocess_mode="max",
        )
    name = bundle.tag.split(":", 1)[0]
    _model_info_gauge.labels(name, bundle.version, bundle.architecture).set(1)


def _show_lantern_logs() -> None:
    """Let INFO records of the `lantern.*` loggers through in a BentoML worker.

    BentoML's server logging config sets the root logger to WARNING and disables loggers
    that existed before it ran (ours are created at import); the provider line matters.
    """
    for name in list(logging.root.manager.loggerDict):
        if name == "lantern" or name.startswith("lantern."):
            logging.getLogger(name).disabled = False
    logging.getLogger("lantern").setLevel(logging.INFO)
