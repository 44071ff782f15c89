"""Configuration: one settings object read from the environment.

Every setting is an environment variable `LANTERN_<NAME>` (except `REDIS_URL`), with its
default and meaning beside it. The README's settings table is generated from this class
(`lantern settings`), so the two cannot drift apart.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LANTERN_", extra="ignore")

    model: str = Field(
        "lantern-classifier:production",
        description="BentoML model tag the service and workers load, resolved when they "
        "start: a version, `latest`, or an alias set by `lantern models promote` "
        "(`production` follows `latest` until a version is promoted).",
    )
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        validation_alias=AliasChoices("REDIS_URL", "LANTERN_REDIS_URL"),
        description="Redis for the explanation queue (env REDIS_URL). `make up` starts its "
        "own Redis when this is unset.",
    )
    artifact_dir: Path = Field(
        Path("var/artifacts"),
        description="Directory where explanation artifacts are stored (a shared volume in "
        "compose).",
    )
    queue: str = Field("lantern-explain", description="RQ queue name for explanation jobs.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Worker device: auto, cpu or cuda."
    )
    max_upload_bytes: int = Field(10 * 1024 * 1024, description="Largest accepted upload.")
    max_pixels: int = Field(40_000_000, description="Largest accepted image, in pixels.")
    max_batch_images: int = Field(
        64, description="Most images one /predict_batch request may carry."
    )
    max_batch_bytes: int = Field(
        64 * 1024 * 1024,
        description="Largest accepted /predict_batch or /explain request body, in bytes.",
    )
    max_images_per_job: int = Field(64, description="Most images one /explain job may carry.")
    job_ttl_seconds: int = Field(
        24 * 3600, description="How long jobs and their artifacts are kept."
    )
    job_timeout_seconds: int = Field(600, description="Longest a single job may run.")
    job_retries: int = Field(2, description="Retries of a job whose worker died or failed.")
    explain_chunk_size: int = Field(
        16, description="Images per forward/backward pass in a worker (halved on CUDA OOM)."
    )
    explain_group_jobs: int = Field(
        32,
        description="Most queued jobs for the same model version, layers and methods a "
        "worker takes together and explains in one chunked pass (each still gets its own "
        "artifacts, progress and manifest), up to max_images_per_job images; 1 turns "
        "grouping off.",
        ge=1,
    )
    worker_heartbeat_seconds: int = Field(
        10,
        description="How often a busy explanation worker proves it is alive; a job whose "
        "worker misses three heartbeats in a row counts as abandoned (retried or failed).",
    )
    worker_maintenance_seconds: int = Field(
        30,
        description="How often a worker looks for jobs abandoned by dead workers and deletes "
        "artifacts older than job_ttl_seconds.",
    )
    redis_retry_seconds: int = Field(
        300,
        description="How long a busy worker keeps retrying a Redis write (progress, result, "
        "failure) during an outage before leaving the job to be retried by maintenance.",
    )
    redis_appendfsync: Literal["everysec", "always"] = Field(
        "everysec",
        description="fsync policy of the Redis that `lantern up` starts: everysec (a power "
        "loss may drop the last second of accepted jobs) or always (none, slower writes).",
    )
    inline_image_bytes: int = Field(
        256 * 1024,
        description="Images up to this size travel inside the job payload; larger ones "
        "are written to the artifact store and passed by reference.",
    )
    max_batch_size: int = Field(
        32, description="Micro-batching: most images the model runs in one batch."
    )
    max_latency_ms: int = Field(
        20_000,
        description="Micro-batching: longest a request may wait for its batch to start "
        "before it is refused with 503 (ResNet-50 on 2 CPU cores: ~1.6 s per batch of 32).",
    )
    keep_alive_seconds: int = Field(
        75,
        ge=1,
        description="How long the API keeps an idle kept-alive HTTP connection open. Longer "
        "than the idle timeouts of the clients and proxies in front of it (httpx and Node.js "
        "5 s, AWS ALB 60 s), so that they close an idle connection first: a server that "
        "closes first can do it just as the client sends its next request on it, and that "
        "request fails with a connection error.",
    )
    ort_threads: int = Field(
        0, description="ONNX Runtime intra-op threads (0: one per physical core)."
    )
    model_streams: int = Field(
        0,
        ge=0,
        description="Batches the service runs at once on the CPU, each on one thread of its "
        "own (0: one per usable CPU; 1: one batch at a time over every core). A lone request "
        "still gets every core. On CUDA always 1.",
    )
    ort_provider: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="ONNX Runtime execution provider: auto, cpu or cuda."
    )
    precision: Literal["auto", "fp32", "int8", "fp16"] = Field(
        "auto",
        description="Which graph of the model the service runs: auto (INT8 on the CPU when "
        "the bundle has one that passed its gate, fp16 on CUDA when it has an fp16 graph, "
        "else fp32), or fp32, int8, fp16 (the service refuses to start if the bundle lacks it).",
    )
    runtime: Literal["onnxruntime", "openvino"] = Field(
        "onnxruntime",
        description="What runs the model in the service: onnxruntime, or openvino (CPU only; "
        "`pip install 'lantern[openvino]'`): the same ONNX graphs, fp32 computed in fp32 "
        "and the INT8 graph as exported (on an Intel CPU with AMX its INT8 ran 2-3x faster; "
        "on an AMD EPYC with AVX2 no faster: BENCHMARKS.md). With openvino, auto precision is "
        "INT8 when the bundle's INT8 graph also passed its gate as OpenVINO runs it (checked "
        "by `lantern export` when openvino is installed), else fp32; fp16 and "
        "LANTERN_ORT_PROVIDER=cuda are refused; LANTERN_ORT_THREADS and "
        "LANTERN_MODEL_STREAMS apply to it too.",
    )
    api_keys: SecretStr = Field(
        SecretStr(""),
        description="API keys, comma-separated (empty: no authentication). When set, every "
        "route but /livez, /readyz and the web page's static files needs "
        "`Authorization: Bearer <key>` or `X-API-Key: <key>`.",
    )
    metrics_public: bool = Field(
        False, description="Leave /metrics open without an API key (for a Prometheus scraper)."
    )
    log_format: Literal["text", "json"] = Field(
        "text",
        description="Log lines of every Lantern process (API, workers, CLI; BentoML's and "
        "RQ's lines included): text, or json (one JSON object per line with time, level, "
        "logger, message, and request_id / job_id when known).",
    )

    def api_key_list(self) -> list[str]:
        """The configured API keys (empty: authentication is off)."""
        return [k.strip() for k in self.api_keys.get_secret_value().split(",") if k.strip()]


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
