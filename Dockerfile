# Two images from one tree, as docker-compose.yml builds them:
#   api     BentoML + ONNX Runtime, no torch                      -> `lantern serve`
#   worker  + PyTorch/torchvision (PyPI's CUDA build; runs on CPU) -> `lantern worker`, `train`
# Both install exactly constraints.txt, the versions the tests ran, and run as the unprivileged
# user `lantern` (uid 10001). No `# syntax=` line: the engine's built-in BuildKit frontend is
# enough, and that line makes BuildKit fetch a frontend image from a registry.
#
# LANTERN_BASE_IMAGE: any Debian or Ubuntu image with apt (default debian:bookworm-slim, whose
# python3 is the 3.11 the tests run). PyTorch's wheels bring their own CUDA libraries, so GPU
# hosts need no CUDA base image, only NVIDIA's container toolkit (docker-compose.gpu.yml).
ARG LANTERN_BASE_IMAGE=debian:bookworm-slim

FROM ${LANTERN_BASE_IMAGE} AS base
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    BENTOML_DO_NOT_TRACK=true \
    BENTOML_HOME=/data/bentoml \
    LANTERN_ARTIFACT_DIR=/data/artifacts \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
# The mount points exist in the image, owned by lantern, so that named volumes start out
# writable by it (Docker copies a mount point's owner into a new, empty volume).
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv \
 && useradd --uid 10001 --user-group --home-dir /app --no-create-home \
      --shell /usr/sbin/nologin lantern \
 && mkdir -p /app/runs /app/data /data/bentoml /data/artifacts \
 && chown -R lantern:lantern /app /data
WORKDIR /app
COPY constraints.txt pyproject.toml ./
COPY deploy/requirements.py deploy/

# Dependencies first, in their own layers: a change of Lantern's code reuses them. The pip
# cache is a BuildKit cache mount, kept by the engine between builds and never in the image.
FROM base AS api-deps
RUN --mount=type=cache,target=/root/.cache/pip \
    python3 deploy/requirements.py > /tmp/requirements.txt \
 && pip install -c constraints.txt -r /tmp/requirements.txt

FROM base AS worker-deps
RUN --mount=type=cache,target=/root/.cache/pip \
    python3 deploy/requirements.py torch > /tmp/requirements.txt \
 && pip install -c constraints.txt -r /tmp/requirements.txt

# Lantern's code only, copied onto either set of dependencies.
FROM scratch AS source
COPY README.md /src/
COPY lantern /src/lantern
COPY models /src/models
COPY service /src/service
COPY workers /src/workers

FROM api-deps AS api
COPY --from=source /src/ /app/
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install -c constraints.txt --no-deps . \
 && python3 -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is not None)"
USER lantern
LABEL org.opencontainers.image.title=lantern org.opencontainers.image.description="Lantern API"
EXPOSE 3000
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=5 \
  CMD ["python", "-c", "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:3000/readyz').status != 200)"]
CMD ["lantern", "serve", "--host", "0.0.0.0", "--port", "3000"]

FROM worker-deps AS worker
COPY --from=source /src/ /app/
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install -c constraints.txt --no-deps .
USER lantern
LABEL org.opencontainers.image.title=lantern org.opencontainers.image.description="Lantern worker"
# Connected and working: this container's worker is registered in Redis, alive, and idle or
# busy (`lantern worker --check` says which, and why not).
HEALTHCHECK --interval=15s --timeout=10s --start-period=120s --retries=4 \
  CMD ["lantern", "worker", "--check"]
CMD ["lantern", "worker"]
