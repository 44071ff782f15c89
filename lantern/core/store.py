"""The artifact store: explanation files addressed by (job id, file name). Torch-free.

Layout of the default, directory-backed store (`settings.artifact_dir`):

    <root>/<job_id>/manifest.json                  written last: its presence means "complete"
    <root>/<job_id>/<image>.<method>.npy            raw map as computed: native resolution
                                                    (h, w) of its layer (the input's for
                                                    saliency), float32, unnormalised
    <root>/<job_id>/<image>.<method>.upsampled.npy  that map upsampled (bilinear) to the
                                                    model's input size, float32
    <root>/<job_id>/<image>.<method>.heatmap.png    the upsampled map scaled to [0, 1], on
                                                    the model's input crop
    <root>/<job_id>/<image>.<method>.overlay.png    the same, blended over the original picture
    <root>/<job_id>/<image>.activations.grid.png    strongest channels of the activation layer
    <root>/<job_id>/<image>.activations.channels.npy  those channels, float32 (k, h, w), native
    <root>/<job_id>/<image>.<method>.rank<r>.*      compare_top: the same four files for the
                                                    image's r-th most probable class (r >= 2)
    <root>/<job_id>/<image>.depth.png               depth: a row per stage, strongest channels
    <root>/<job_id>/<image>.depth.<layer>.npy       those channels of each stage, float32 (k, h, w)
    <root>/<job_id>/inputs/<image>                  an input image passed by reference

The manifest says, per method (`maps`), the raw map's shape, dtype, layer and exact
definition, the upsampling and display scaling behind the PNGs, and that BatchNorm is
folded into the convolutions (`batchnorm`); workers.manifest writes it.

Both parts of an address are checked against strict patterns before any path is built, so
no request can name a file outside its job's directory: a job id is one safe path component
of letters, digits, `_` and `-` (the store keeps any such key; the ids Lantern's jobs use,
`ex-` and 32 hex digits, are one kind of it: lantern.core.jobs.is_explain_job_id); a
file name is one such component with dots (never two in a row), optionally under the
single fixed sub-directory `inputs/`.

`ArtifactStore` is the interface the workers and the service use; an S3-compatible store
would implement the same six methods with keys `<job_id>/<name>`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Protocol

from lantern.core.errors import InvalidAddress, JobError
from lantern.core.settings import Settings

MANIFEST = "manifest.json"
INPUTS_DIR = "inputs"

JOB_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_COMPONENT = r"[A-Za-z0-9](?:[A-Za-z0-9_-]|\.(?!\.)){0,127}"
FILE_NAME_RE = re.compile(rf"(?:{INPUTS_DIR}/)?{_COMPONENT}")


def is_valid_job_id(job_id: str) -> bool:
    return isinstance(job_id, str) and JOB_ID_RE.fullmatch(job_id) is not None


def is_valid_file_name(name: str) -> bool:
    return isinstance(name, str) and FILE_NAME_RE.fullmatch(name) is not None


def check_job_id(job_id: str) -> str:
    if not is_valid_job_id(job_id):
        raise InvalidAddress(f"{job_id!r} is not a valid job id")
    return job_id


def check_file_name(name: str) -> str:
    if not is_valid_file_name(name):
        raise InvalidAddress(f"{name!r} is not a valid artifact file name")
    return name


class ArtifactStore(Protocol):
    def write(self, job_id: str, name: str, data: bytes) -> None: ...
    def read(self, job_id: str, name: str) -> bytes: ...
    def exists(self, job_id: str, name: str) -> bool: ...
    def list_files(self, job_id: str) -> list[str]: ...
    def expire(self, max_age_seconds: float, now: float | None = None) -> list[str]: ...
    def delete(self, job_id: str) -> None: ...


class DirectoryStore:
    """Artifacts as files under `root`, one directory per job; writes are atomic."""

    def __init__(self, root: Path | str):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"DirectoryStore({str(self.root)!r})"

    def _path(self, job_id: str, name: str) -> Path:
        return self.root / check_job_id(job_id) / check_file_name(name)

    def write(self, job_id: str, name: str, data: bytes) -> None:
        path = self._path(job_id, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename: a reader sees the whole file or none of it.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def read(self, job_id: str, name: str) -> bytes:
        path = self._path(job_id, name)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise JobError(f"job {job_id} has no artifact {name!r}") from None

    def exists(self, job_id: str, name: str) -> bool:
        return self._path(job_id, name).is_file()

    def list_files(self, job_id: str) -> list[str]:
        """Every artifact of the job, `inputs/` included, sorted; [] for an unknown job."""
        job_dir = self.root / check_job_id(job_id)
        if not job_dir.is_dir():
            return []
        names = [
            p.relative_to(job_dir).as_posix()
            for p in job_dir.rglob("*")
            if p.is_file() and not p.name.startswith(".tmp-")
        ]
        return sorted(n for n in names if is_valid_file_name(n))

    def delete(self, job_id: str) -> None:
        """Delete every file of the job, the manifest first (so the job stops counting
        as complete before anything else goes); nothing happens for an unknown job."""
        job_dir = self.root / check_job_id(job_id)
        (job_dir / MANIFEST).unlink(missing_ok=True)
        shutil.rmtree(job_dir, ignore_errors=True)

    def expire(self, max_age_seconds: float, now: float | None = None) -> list[str]:
        """Delete job directories last written more than `max_age_seconds` ago."""
        if not self.root.is_dir():
            return []
        cutoff = (time.time() if now is None else now) - max_age_seconds
        removed = []
        for job_dir in self.root.iterdir():
            if not (job_dir.is_dir() and is_valid_job_id(job_dir.name)):
                continue
            try:
                if job_dir.stat().st_mtime < cutoff:
                    shutil.rmtree(job_dir, ignore_errors=True)
                    removed.append(job_dir.name)
            except FileNotFoundError:  # removed by another worker meanwhile
                continue
        return sorted(removed)


def open_store(settings: Settings) -> DirectoryStore:
    """The store the settings name (a directory; the only kind built so far)."""
    return DirectoryStore(settings.artifact_dir)


def write_manifest(store: ArtifactStore, job_id: str, manifest: dict[str, Any]) -> None:
    store.write(job_id, MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode())


def read_manifest(store: ArtifactStore, job_id: str) -> dict[str, Any] | None:
    """The job's manifest, or None while the job is unfinished or unknown."""
    if not store.exists(job_id, MANIFEST):
        return None
    result: dict[str, Any] = json.loads(store.read(job_id, MANIFEST))
    return result


def expire_artifacts(store: ArtifactStore, settings: Settings) -> list[str]:
    """Delete the artifacts of jobs older than `settings.job_ttl_seconds`."""
    return store.expire(settings.job_ttl_seconds)
