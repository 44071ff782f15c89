"""GET /models: the model store's versions, through a real `lantern serve` with API keys.

Two versions of a model name of this module's own are registered in the session's model
store (a temporary BENTOML_HOME, tests/conftest.py) the way `lantern export` registers
them; the server serves the older one, so "served" and "newest" are told apart.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import httpx
import pytest

from lantern.core.bundle import Bundle, promote
from tests.conftest import TINY_ARCH, TINY_CLASSES, TINY_SIZE
from tests.service_fixtures import Server, start_server, stop_server

pytestmark = pytest.mark.integration

NAME = "versions-test"
KEY = "models-test-key-0123456789"
ACCURACY = (0.25, 0.5)  # oldest, newest: tells the two apart


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> list[Bundle]:
    """Two versions of NAME, oldest first."""
    import torch

    from lantern.core.preprocess import PreprocessSpec
    from models.checkpoint import save_checkpoint
    from models.export import export_checkpoint
    from models.network import build_model

    made = []
    for seed, accuracy in enumerate(ACCURACY):
        torch.manual_seed(seed)
        model = build_model(TINY_ARCH, len(TINY_CLASSES), weights="none")
        ckpt = save_checkpoint(
            tmp_path_factory.mktemp("versions") / "best.pt",
            model,
            architecture=TINY_ARCH,
            class_names=TINY_CLASSES,
            spec=PreprocessSpec(crop_size=TINY_SIZE, resize_size=TINY_SIZE),
            training={"mode": "all", "dataset": "shapes", "epochs": 0},
            metrics={"accuracy": accuracy},
        )
        made.append(export_checkpoint(ckpt, name=NAME))
    return made


@pytest.fixture(scope="module")
def server(versions: list[Bundle], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("versions-serve") / "serve.log"
    running = start_server(versions[0].tag, log, extra_env={"LANTERN_API_KEYS": KEY})
    yield running
    stop_server(running)


def _models(server: Server) -> dict[str, Any]:
    response = httpx.get(server.url + "/models", headers={"X-API-Key": KEY}, timeout=10)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def test_every_version_newest_first_and_the_served_one(
    server: Server, versions: list[Bundle]
) -> None:
    old, new = versions
    body = _models(server)
    assert body["served"] == old.tag
    listed = body["versions"]
    assert [v["tag"] for v in listed] == [new.tag, old.tag]
    assert [v["version"] for v in listed] == [new.version, old.version]
    assert [v["accuracy"] for v in listed] == list(reversed(ACCURACY))
    for row, bundle in zip(listed, (new, old), strict=True):
        assert row["architecture"] == TINY_ARCH and row["classes"] == len(TINY_CLASSES)
        assert row["demo"] is None  # a real model, not the offline demo
        assert row["int8"] == bundle.int8  # the export's INT8 record, as meta.json has it
        assert row["created_at"] == bundle.meta["created_at"]
    created = [datetime.fromisoformat(v["created_at"]) for v in listed]
    assert created[0] >= created[1]
    # the same rows `lantern models list --json` prints (less its training details)
    cli = subprocess.run(
        [sys.executable, "-m", "lantern.cli", "models", "list", "--json", "--name", NAME],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ},
    )
    assert cli.returncode == 0, cli.stderr
    assert [{k: row[k] for k in listed[0]} for row in json.loads(cli.stdout)] == listed


def test_the_store_is_read_on_each_request(server: Server, versions: list[Bundle]) -> None:
    old, _ = versions
    promote(old.version, "staging", NAME)
    by_tag = {v["tag"]: v["aliases"] for v in _models(server)["versions"]}
    assert by_tag[old.tag] == ["staging"]


def test_without_a_valid_key_it_is_a_401(server: Server) -> None:
    for headers, word in (({}, "needs an API key"), ({"X-API-Key": "wrong"}, "not valid")):
        response = httpx.get(server.url + "/models", headers=headers, timeout=10)
        assert response.status_code == 401, response.text
        assert word in response.json()["error"]


def test_model_latest_names_the_newest_version_whichever_one_is_served(
    versions: list[Bundle],
) -> None:
    from service.explanations import resolve_model

    old, new = versions
    # The service serves the older one; `model=latest` still means the newest in the store,
    # resolved to its concrete tag (what the job id is made from).
    assert resolve_model("latest", old).tag == new.tag
    assert resolve_model(new.version, old).tag == new.tag
    assert resolve_model(new.tag, old).tag == new.tag
    assert resolve_model("", old).tag == old.tag
    assert resolve_model("latest", new).tag == new.tag
