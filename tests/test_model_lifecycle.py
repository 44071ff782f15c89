"""Model lifecycle: promote a version to an alias the service follows, roll back, delete.

Real commands (`lantern models ...`) and a real `lantern serve` on the session's model
store, under a model name of this test's own so no other test sees its aliases.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from lantern.core.bundle import Bundle, aliases, list_bundles, load_bundle, resolve_alias
from tests.conftest import register_tiny
from tests.service_fixtures import server_environments, start_server, stop_server
from tests.worker_fixtures import shape_png

pytestmark = pytest.mark.integration

NAME = "lifecycle-test"


def _lantern(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lantern.cli", "models", *args, "--name", NAME],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ},
    )


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> list[Bundle]:
    """Two versions of NAME, oldest first (test_promote_roll_back_and_delete deletes the
    oldest)."""
    return [
        register_tiny(tmp_path_factory.mktemp("lifecycle"), seed=seed, name=NAME) for seed in (1, 2)
    ]


def test_production_follows_latest_until_a_version_is_promoted(versions: list[Bundle]) -> None:
    _, new = versions
    assert aliases(NAME) == {}
    assert load_bundle(f"{NAME}:production").tag == load_bundle(f"{NAME}:latest").tag == new.tag


def test_promote_roll_back_and_delete(versions: list[Bundle], tmp_path: Path) -> None:
    old, new = versions
    promoted = _lantern("promote", old.version)
    assert promoted.returncode == 0, promoted.stderr
    assert f"{NAME}:production -> {old.tag}" in promoted.stdout
    assert resolve_alias(f"{NAME}:production") == old.tag

    # The service follows the alias when it starts.
    server = start_server(f"{NAME}:production", tmp_path / "serve.log")
    try:
        status = httpx.get(server.url + "/status", timeout=10).json()
        assert status["predictions"]["model"] == old.tag
        answer = httpx.post(
            server.url + "/predict", files={"image": ("a.png", shape_png(1))}, timeout=30
        )
        assert answer.status_code == 200 and answer.json()["model_version"] == old.version
        # Pinned once (README: "the API pins it once, so every server worker serves the
        # same one"): every process of the server was given the version, not the alias,
        # so a promotion while it runs changes nothing until it is restarted.
        environments = server_environments(server)
        assert len(environments) >= 2  # the arbiter and a service worker
        pinned = {pid: env["LANTERN_MODEL"] for pid, env in environments.items()}
        assert set(pinned.values()) == {old.tag}, pinned
        assert _lantern("promote", new.version).returncode == 0
        answer = httpx.post(
            server.url + "/predict", files={"image": ("b.png", shape_png(2))}, timeout=30
        )
        assert answer.status_code == 200 and answer.json()["model_version"] == old.version
        assert _lantern("promote", old.version).returncode == 0
    finally:
        stop_server(server)

    # Another alias for a second deployment: production stays where it was.
    staged = _lantern("promote", new.version, "--alias", "staging")
    assert staged.returncode == 0 and f"{NAME}:staging -> {new.tag}" in staged.stdout
    assert resolve_alias(f"{NAME}:production") == old.tag
    assert load_bundle(f"{NAME}:staging").tag == new.tag  # what LANTERN_MODEL=...:staging loads
    assert load_bundle(f"{NAME}:production").tag == old.tag

    listed = json.loads(_lantern("list", "--json").stdout)
    assert {row["tag"]: row["aliases"] for row in listed} == {
        new.tag: ["staging"],
        old.tag: ["production"],
    }
    table = _lantern("list").stdout
    assert "ALIASES" in table and any(
        line.startswith(old.tag) and line.rstrip().endswith("production")
        for line in table.splitlines()
    )

    # The promoted version cannot be deleted; roll back to the other, then it can.
    refused = _lantern("delete", old.version)
    assert refused.returncode == 2 and "is the production model" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert _lantern("promote", new.version).returncode == 0
    assert resolve_alias(f"{NAME}:production") == new.tag
    deleted = _lantern("delete", old.version)
    assert deleted.returncode == 0 and old.tag in deleted.stdout
    assert [row["tag"] for row in json.loads(_lantern("list", "--json").stdout)] == [new.tag]


def test_bad_lifecycle_commands_are_one_line_errors(versions: list[Bundle]) -> None:
    for args, expected in [
        (("promote",), "needs a VERSION"),
        (("promote", "nosuchversion"), "no model"),
        (("promote", versions[1].version, "--alias", "latest"), "is not an alias name"),
        (("delete", "nosuchversion"), "no model"),
    ]:
        result = _lantern(*args)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert expected in result.stderr and "Traceback" not in result.stderr, (args, result.stderr)


@pytest.mark.parametrize("missing", ["v0nosuchversion", "canary"])
def test_ensure_refuses_a_missing_version_or_alias_instead_of_training_a_first_model(
    versions: list[Bundle], missing: str
) -> None:
    """README: `make up` and compose's `model` step make a first model only "if the store
    has none". With versions in the store, a LANTERN_MODEL naming a version that is not
    there (a typo) or an alias never promoted is a one-line error, and nothing is trained
    or registered (a training run would become the newest version, which `production`
    follows)."""
    before = {b.tag for b in list_bundles(NAME)}
    result = subprocess.run(
        [sys.executable, "-m", "lantern.cli", "models", "ensure", "--name", NAME],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "LANTERN_MODEL": f"{NAME}:{missing}"},
    )  # fmt: skip
    assert result.returncode != 0, result.stdout[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr[-3000:]
    assert missing in lines[0] and f"the store has {len(before)} version(s)" in lines[0]
    assert {b.tag for b in list_bundles(NAME)} == before
    # The tag that is there is ready, and nothing is made either.
    newest = versions[-1]
    ready = subprocess.run(
        [sys.executable, "-m", "lantern.cli", "models", "ensure", "--name", NAME],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "LANTERN_MODEL": newest.tag},
    )  # fmt: skip
    assert ready.returncode == 0 and f"model {newest.tag} is ready" in ready.stdout, ready.stderr
    assert {b.tag for b in list_bundles(NAME)} == before


def test_a_worker_keeps_the_two_most_recently_used_versions_and_reloads_an_evicted_one(
    versions: list[Bundle], tiny_bundle: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """workers/model_cache: any client can name any stored version (`model=`), so a
    worker must not keep them all: it holds MODEL_CACHE_SIZE (2), the least recently used
    goes, and asking for it again loads it again."""
    import torch

    from workers.model_cache import MODEL_CACHE_SIZE, ModelCache

    assert MODEL_CACHE_SIZE == 2
    # Three versions that no other test deletes (the oldest of `versions` may be gone).
    third = register_tiny(tmp_path, seed=3, name="cache-test")
    a, b, c = versions[-1].tag, tiny_bundle.tag, third.tag
    cache = ModelCache(torch.device("cpu"))
    with caplog.at_level("INFO", logger="workers.model_cache"):
        first_a, first_b = cache.get(a), cache.get(b)
        assert cache.get(a) is first_a  # a hit, and now the most recently used
        cache.get(c)  # evicts b, the least recently used
        assert cache.get(a) is first_a
        again_b = cache.get(b)  # loaded again (and evicts c)
    assert again_b is not first_b and again_b.bundle.tag == b
    loads = [
        r.getMessage().split()[1] for r in caplog.records if r.getMessage().startswith("loaded ")
    ]
    assert loads == [a, b, c, b], loads
