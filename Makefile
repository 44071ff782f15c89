# Lantern's front door. `make up` runs the whole system; `make test` runs the whole suite.
# Both create .venv with Python 3.11 and install everything the project needs.

SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=
# The browser tests drive Debian's Chromium; Playwright's own browser downloads are not used.
CHROMIUM ?= /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

export BENTOML_DO_NOT_TRACK := true
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: help install up test bench soak lint typecheck check clean lock compose-test

help:
	@echo "make up      start Redis, an explanation worker and the API on http://127.0.0.1:3000"
	@echo "make test    install everything into $(VENV) and run the whole test suite"
	@echo "make bench   prediction (vs TorchServe), explanation, localisation and GPU benchmarks (writes nothing outside /tmp)"
	@echo "make soak    memory soak: RSS of the API over 10,000 /predict requests (BENCHMARKS.md)"
	@echo "make lint    ruff;  make typecheck  mypy;  make check  both"
	@echo "make compose-test  build the Docker images and run the compose stack end to end"
	@echo "make lock    re-resolve constraints.txt (the pinned versions tests and images install)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch and torchvision come from the package index as a matching pair (pyproject.toml pins
# both ranges); the CUDA build runs on CPU too. constraints.txt pins every package to the
# version the tests ran; the Docker images install from the same file.
$(VENV)/.installed: pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install --upgrade "pip>=24"
	$(BIN)/python -m pip install -c constraints.txt -e ".[dev]"
	@touch $@

$(VENV)/.installed-bench: $(VENV)/.installed
	$(BIN)/python -m pip install -c constraints.txt -e ".[dev,bench]"
	@touch $@

# The newest releases pyproject.toml allows, resolved once and written down. Run `make test`
# (and `make compose-test`) after it, and commit constraints.txt with what they proved.
lock: | $(BIN)/python
	$(BIN)/python -m pip install --dry-run --ignore-installed --quiet \
	  --report $(VENV)/lock-report.json ".[dev,bench]"
	$(BIN)/python deploy/lock.py $(VENV)/lock-report.json > constraints.txt

install: $(VENV)/.installed

# TorchServe (bench/torchserve.py, in `make bench`) runs on Java 17: Debian's, as for chromium.
JAVA ?= /usr/bin/java
$(JAVA):
	@echo "installing Debian's Java 17 for TorchServe (bench/torchserve.py)"
	$(SUDO) apt-get update
	$(SUDO) apt-get install -y --no-install-recommends openjdk-17-jre-headless

$(CHROMIUM):
	@echo "installing Debian's chromium for the browser tests (tests/test_page.py)"
	$(SUDO) apt-get update
	$(SUDO) apt-get install -y --no-install-recommends chromium

up: install
	$(BIN)/lantern up

test: install $(CHROMIUM)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# One run tells the story (BENCHMARKS.md): fp32 vs INT8 raw and through the service, TorchServe
# beside it, explanations, jobs explained together, localisation; the GPU part where there is one.
bench: $(VENV)/.installed-bench $(JAVA)
	$(BIN)/python -m bench.predict
	$(BIN)/python -m bench.torchserve
	$(BIN)/python -m bench.explain
	$(BIN)/python -m bench.explain_batching
	$(BIN)/python -m bench.localisation
	@if nvidia-smi -L >/dev/null 2>&1; then $(BIN)/python -m bench.gpu; \
	else echo "bench.gpu: no NVIDIA GPU on this machine (nvidia-smi -L), skipped"; fi

# ResNet-50 at 224 px: about 10 minutes on 2 quiet cores (SOAK_ARGS="--arch resnet18
# --image-size 64" for a quick one).
SOAK_ARGS ?=
soak: $(VENV)/.installed
	$(BIN)/python -m bench.soak $(SOAK_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

check: lint typecheck

# Real containers: dockerd (started if it is not running), Compose v2, images built from
# this tree, the CPU stack up, a prediction and an explanation through the published port,
# Redis restarted, everything torn down (deploy/compose_e2e.py says each step).
compose-test: install
	$(BIN)/python deploy/compose_e2e.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
