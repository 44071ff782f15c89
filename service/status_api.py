"""GET /status, and the explanation lines of /metrics: both read Redis when asked, quickly.

    GET /status   {"predictions": {"ready", "model", "provider"},
                   "explanations": {"available", "redis", "workers", "queue_depth", "reason"}}

`ExplainProbe` holds its own Redis client with short timeouts and no retries, so /status
and a /metrics scrape answer in well under a second while Redis is down or unreachable.
"""

from __future__ import annotations

import logging
from typing import Any

import anyio
import redis
from fastapi import APIRouter
from pydantic import BaseModel, Field
from redis.backoff import NoBackoff
from redis.retry import Retry

from lantern.core.job_metrics import ExplainMetrics, read_explain_metrics, render
from lantern.core.settings import Settings
from service.dependencies import CurrentService

log = logging.getLogger("lantern.service")

CONNECT_TIMEOUT_S = 0.5
READ_TIMEOUT_S = 1.0

router = APIRouter()


class ExplainProbe:
    """Reads the explanation side's state from Redis; never raises for Redis trouble."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.redis = redis.Redis.from_url(
            settings.redis_url,
            socket_connect_timeout=CONNECT_TIMEOUT_S,
            socket_timeout=READ_TIMEOUT_S,
            retry=Retry(NoBackoff(), 0),
        )

    def read(self) -> ExplainMetrics:
        try:
            return read_explain_metrics(self.redis, self.settings)
        except Exception as e:  # a scrape or /status must never fail
            log.warning("reading explanation metrics failed: %s", e)
            return ExplainMetrics(available=False, reason=f"cannot read the queue ({e})")

    def metrics_text(self) -> str:
        return render(self.read())

    def status(self) -> dict[str, Any]:
        m = self.read()
        reason = None
        if not m.available:
            reason = (
                f"the explanation queue is unavailable: {m.reason}; predictions still work, "
                "explanations resume when Redis is back"
            )
        elif m.workers == 0:
            reason = (
                "no explanation worker is running: new jobs wait in the queue until one "
                "starts (lantern worker)"
            )
        return {
            "available": m.available and m.workers > 0,
            "redis": "ok" if m.available else "unreachable",
            "workers": m.workers,
            "queue_depth": m.queue_depth,
            "reason": reason,
        }


class PredictionsStatus(BaseModel):
    model_config = {"protected_namespaces": ()}

    ready: bool = Field(description="The model is loaded and answers /predict.")
    model: str = Field(description="The model version served, 'name:version'.")
    provider: str = Field(description="The ONNX Runtime execution provider in use.")


class ExplanationsStatus(BaseModel):
    available: bool = Field(description="Redis answers and at least one worker is live.")
    redis: str = Field(description="'ok' or 'unreachable'.")
    workers: int = Field(description="Live explanation workers on the queue.")
    queue_depth: int = Field(description="Jobs waiting in the queue.")
    reason: str | None = Field(description="Why explanations are unavailable, if they are.")


class ServiceStatus(BaseModel):
    predictions: PredictionsStatus
    explanations: ExplanationsStatus


@router.get(
    "/status", response_model=ServiceStatus, summary="Predictions and explanations at a glance"
)
async def status(lantern: CurrentService) -> dict[str, Any]:
    explanations = await anyio.to_thread.run_sync(lantern.explain_probe.status)
    return {
        "predictions": {
            "ready": lantern.session is not None,
            "model": str(lantern.bundle.tag),
            "provider": lantern.provider,
        },
        "explanations": explanations,
    }
