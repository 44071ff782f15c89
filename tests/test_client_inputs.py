"""The batch client's local side: which files it collects, where their results go, and how
it splits a batch the service refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from lantern.client import Batches, RequestRejected, collect_images
from lantern.core.errors import UsageError


def touch(root: Path, *names: str) -> None:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")


def test_folders_are_walked_recursively_by_extension_and_keyed_by_relative_path(
    tmp_path: Path,
) -> None:
    touch(
        tmp_path / "in",
        "a.PNG", "cats/b.jpeg", "cats/deep/c.webp", "cats/notes.txt", ".hidden/d.png",
        "cats/.e.png", "out/old.png",
    )  # fmt: skip
    single = tmp_path / "single.gif"
    touch(tmp_path, "single.gif")
    images = collect_images([tmp_path / "in", single], exclude=tmp_path / "in/out")
    assert [(i.path.relative_to(tmp_path).as_posix(), i.key) for i in images] == [
        ("in/a.PNG", "a"),
        ("in/cats/b.jpeg", "cats/b"),
        ("in/cats/deep/c.webp", "cats/deep/c"),
        ("single.gif", "single"),
    ]
    assert images[1].name == "b.jpeg"


def test_images_sharing_a_stem_keep_their_extension(tmp_path: Path) -> None:
    touch(tmp_path, "x.png", "x.jpg", "y.png")
    assert [i.key for i in collect_images([tmp_path])] == ["x.jpg", "x.png", "y"]


def test_two_inputs_writing_to_the_same_place_are_refused(tmp_path: Path) -> None:
    touch(tmp_path, "one/a.png", "two/a.png")
    with pytest.raises(UsageError, match="same place"):
        collect_images([tmp_path / "one", tmp_path / "two"])


def test_a_missing_path_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        collect_images([tmp_path / "nope"])


def drain(batches: Batches[int], refuse: dict[int, RequestRejected]) -> list[list[int]]:
    """Send every chunk; a chunk holding a key of `refuse` is refused with that error."""
    sent: list[list[int]] = []
    while batches:
        chunk = batches.next()
        sent.append(chunk)
        error = next((refuse[i] for i in chunk if i in refuse), None)
        if error is not None:
            batches.rejected(chunk, error)
    return sent


def test_a_refused_chunk_is_resent_image_by_image() -> None:
    bad = RequestRejected("images[1] (3.png) is not an image Lantern can read", 415)
    sent = drain(Batches(list(range(6)), 4), {3: bad})
    assert sent == [[0, 1, 2, 3], [0], [1], [2], [3], [4, 5]]


def test_too_many_images_shrinks_the_batch_to_the_stated_limit() -> None:
    too_many = RequestRejected("too many files in one request; the limit is 3", 413)
    batches = Batches(list(range(7)), 5)
    first = batches.next()
    assert batches.rejected(first, too_many)
    assert batches.size == 3
    assert drain(batches, {}) == [[0, 1, 2], [3, 4], [5, 6]]


def test_too_many_images_without_a_stated_limit_halves_the_batch() -> None:
    batches = Batches(list(range(4)), 4)
    assert batches.rejected(batches.next(), RequestRejected("too many files", 413))
    assert batches.size == 2


def test_a_single_refused_image_is_the_callers_to_report() -> None:
    batches = Batches([7], 4)
    assert not batches.rejected(batches.next(), RequestRejected("bad", 422))
    assert not batches


def test_a_file_over_the_size_limit_is_not_mistaken_for_too_many_images() -> None:
    error = RequestRejected("images[2] (x.png) is 2,000,000 bytes; the limit is 1,000,000", 413)
    assert not error.too_many_images and error.image_limit is None
