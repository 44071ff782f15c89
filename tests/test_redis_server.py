"""The Redis that `lantern up` runs: private (a password kept 0600, never on the command
line), loopback only, with the fsync policy the settings ask for."""

from __future__ import annotations

from pathlib import Path

import pytest

from lantern.redis_server import start_redis
from lantern.stack import redact, redis_password
from tests.conftest import free_port

pytestmark = pytest.mark.integration


def test_the_password_is_made_once_kept_0600_and_reused(tmp_path: Path) -> None:
    first = redis_password(tmp_path / "redis")
    assert len(first) >= 32
    assert (tmp_path / "redis" / "password").stat().st_mode & 0o777 == 0o600
    assert redis_password(tmp_path / "redis") == first
    assert redis_password(tmp_path / "other") != first


def test_a_private_redis_asks_for_its_password_and_fsyncs_as_told(tmp_path: Path) -> None:
    import redis

    port = free_port()
    proc = start_redis(port, tmp_path, password="s3cret-" + "x" * 20, appendfsync="always")
    try:
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port).ping()
        client = redis.Redis(port=port, password="s3cret-" + "x" * 20)
        assert client.config_get("appendfsync") == {"appendfsync": "always"}
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("bind")["bind"] == "127.0.0.1"
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        assert b"s3cret" not in cmdline  # other local users can read the process list
        assert (tmp_path / "redis.conf").stat().st_mode & 0o777 == 0o600
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_an_unknown_fsync_policy_is_refused(tmp_path: Path) -> None:
    from lantern.core.errors import QueueUnavailable

    with pytest.raises(QueueUnavailable, match="everysec or always"):
        start_redis(free_port(), tmp_path, appendfsync="never")


def test_printed_urls_hide_the_password() -> None:
    assert redact("redis://:hunter2@127.0.0.1:6379/0") == "redis://:***@127.0.0.1:6379/0"
    assert redact("redis://user:hunter2@h:1/0") == "redis://user:***@h:1/0"
    assert redact("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
