# syntax=docker/dockerfile:1
# Two images from one tree, as docker-compose.yml builds them:
#   api     BentoML + ONNX Runtime (CUDA 13 provider), no torch  -> `lantern serve`
#   worker  PyTorch + torchvision for explanations and training   -> `lantern worker`
# onnxruntime-gpu 1.31 needs CUDA 13 and cuDNN 9, which the base image brings.
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04

FROM ${CUDA_IMAGE} AS base
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    BENTOML_DO_NOT_TRACK=true \
    BENTOML_HOME=/data/bentoml \
    LANTERN_ARTIFACT_DIR=/data/artifacts \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv
WORKDIR /app
COPY pyproject.toml README.md ./
COPY lantern lantern
COPY models models
COPY service service
COPY workers workers

FROM base AS api
RUN pip install --no-cache-dir .
EXPOSE 3000
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:3000/readyz').status != 200)"
CMD ["lantern", "serve", "--host", "0.0.0.0", "--port", "3000"]

FROM base AS worker
RUN pip install --no-cache-dir ".[torch]"
CMD ["lantern", "worker"]
