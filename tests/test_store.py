"""The artifact store: strict addresses, atomic writes, listing, expiry."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from lantern.core.errors import JobError
from lantern.core.store import (
    DirectoryStore,
    InvalidAddress,
    is_valid_file_name,
    is_valid_job_id,
    read_manifest,
    write_manifest,
)


@pytest.mark.parametrize("job_id", ["ex-0123456789abcdef0123456789abcdef", "job_1", "A"])
def test_valid_job_ids(job_id: str) -> None:
    assert is_valid_job_id(job_id)


@pytest.mark.parametrize(
    "job_id", ["", "..", ".", "a/b", "../etc", "-x", "a b", "a.b", "x" * 65, "é", "a\x00"]
)
def test_invalid_job_ids(job_id: str) -> None:
    assert not is_valid_job_id(job_id)


@pytest.mark.parametrize(
    "name",
    ["manifest.json", "cat.gradcam.overlay.png", "img-01.activations.grid.png", "inputs/cat"],
)
def test_valid_file_names(name: str) -> None:
    assert is_valid_file_name(name)


@pytest.mark.parametrize(
    "name",
    [
        "", "..", "../x", "a/../b", "a..b", ".hidden", "inputs/../manifest.json", "other/x",
        "inputs/", "inputs/sub/x", "/etc/passwd", "a\\b", "x" * 129, "a b.png", "inputs/.x",
    ],
)  # fmt: skip
def test_invalid_file_names(name: str) -> None:
    assert not is_valid_file_name(name)


def test_write_read_list_exists(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path)
    store.write("job1", "a.png", b"png")
    store.write("job1", "inputs/cat", b"jpeg")
    store.write("job1", "a.png", b"png2")  # overwrite
    assert store.read("job1", "a.png") == b"png2"
    assert store.exists("job1", "inputs/cat") and not store.exists("job1", "b.png")
    assert store.list_files("job1") == ["a.png", "inputs/cat"]
    assert store.list_files("nope") == []
    assert sorted(p.name for p in (tmp_path / "job1").iterdir()) == ["a.png", "inputs"]
    with pytest.raises(JobError, match=r"has no artifact 'b\.png'"):
        store.read("job1", "b.png")


def test_addresses_are_checked_before_touching_the_disk(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path / "store")
    (tmp_path / "secret").write_text("s")
    for job_id, name in [("..", "secret"), ("job", "../../secret"), ("job", "/tmp/x")]:
        with pytest.raises(InvalidAddress):
            store.read(job_id, name)
        with pytest.raises(InvalidAddress):
            store.write(job_id, name, b"x")
    assert not (tmp_path / "store").exists()


def test_manifest_round_trip(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path)
    assert read_manifest(store, "j") is None
    write_manifest(store, "j", {"images": [{"name": "a"}]})
    assert read_manifest(store, "j") == {"images": [{"name": "a"}]}


def test_expire_deletes_only_old_job_directories(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path)
    store.write("old", "a.png", b"1")
    store.write("new", "a.png", b"2")
    (tmp_path / "not a job").mkdir()
    long_ago = time.time() - 3600
    os.utime(tmp_path / "old", (long_ago, long_ago))
    os.utime(tmp_path / "not a job", (long_ago, long_ago))
    assert store.expire(max_age_seconds=600) == ["old"]
    assert not store.exists("old", "a.png") and store.exists("new", "a.png")
    assert (tmp_path / "not a job").exists()  # never touches what it did not write
    assert DirectoryStore(tmp_path / "missing").expire(1) == []
