"""Feature extraction that is actually fast: a frozen backbone's features, computed once.

In `head` mode nothing before `fc` learns, so the backbone maps each training image to the
same vector every epoch. `cached_features` runs it once over the training and validation
images (with the evaluation transform: no augmentation, since a cached feature cannot be
re-augmented) and keeps the result on disk under a key of everything that determines it:
architecture, weights (the file's SHA-256 for a checkpoint; the seed for random weights),
data (source, sizes, split, seed, and for an ImageFolder every file's size and mtime) and
preprocessing. A later run with the same key loads the features instead of computing them;
any change of key computes them afresh.

`PeakMemory` samples the process's resident memory (and CUDA's peak allocation) during a run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import resource
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from lantern.core.preprocess import PreprocessSpec

if TYPE_CHECKING:
    from models.train import TrainConfig

log = logging.getLogger(__name__)

FORMAT = 1  # bump when what is cached, or how, changes


def backbone_of(model: nn.Module) -> nn.Module:
    """Everything of a torchvision ResNet before `fc`, ending in a flat feature vector."""
    children = list(model.children())
    assert isinstance(children[-1], nn.Linear), "expects a ResNet whose last module is fc"
    return nn.Sequential(*children[:-1], nn.Flatten(1))


@torch.inference_mode()
def extract_features(
    model: nn.Module,
    dataset: Any,
    device: torch.device,
    batch_size: int,
    workers: int,
    progress: bool,
    desc: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [N, D] float32 on the CPU, labels [N] int64), in dataset order."""
    backbone = backbone_of(model).eval()
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    feats, labels = [], []
    opts = {"file": sys.stderr, "mininterval": 0.5 if sys.stderr.isatty() else 15.0}
    for images, y in tqdm(loader, desc=desc, disable=not progress, **opts):
        images = images.to(device)
        if device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        feats.append(backbone(images).float().cpu())
        labels.append(torch.as_tensor(y, dtype=torch.int64))
    return torch.cat(feats), torch.cat(labels)


def cache_key(cfg: TrainConfig, spec: PreprocessSpec, n_train: int, n_val: int) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "arch": cfg.arch,
        "weights": _weights_identity(cfg.weights, cfg.seed),
        "data": _data_identity(cfg, n_train, n_val),
        "preprocessing": spec.to_dict(),
        "augmentation": False,
    }


def cached_features(
    cfg: TrainConfig,
    spec: PreprocessSpec,
    model: nn.Module,
    train_ds: Any,
    val_ds: Any,
    device: torch.device,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The backbone's features of both splits, from the cache or computed and cached."""
    key = cache_key(cfg, spec, len(train_ds), len(val_ds))
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    cache_dir = Path(cfg.cache_dir or Path(cfg.out_dir) / "feature-cache")
    path = cache_dir / f"{cfg.arch}-{digest}.pt"
    info: dict[str, Any] = {"path": str(path), "key": key, "hit": False}
    if path.is_file():
        try:
            stored = torch.load(path, map_location="cpu", weights_only=True)
            if stored.get("key") == key:
                log.info("head mode: backbone features from the cache %s", path)
                info["hit"] = True
                return {k: stored[k] for k in ("train", "train_labels", "val", "val_labels")}, info
        except Exception as e:  # a damaged cache file is recomputed, never fatal
            log.warning("ignoring unreadable feature cache %s: %s", path, str(e)[:200])
    log.info("head mode: computing the frozen backbone's features once (cached in %s)", path)
    batch = max(cfg.batch_size * 2, 64)
    train_f, train_y = extract_features(
        model, train_ds, device, batch, cfg.workers, cfg.progress, "features train"
    )
    val_f, val_y = extract_features(
        model, val_ds, device, batch, cfg.workers, cfg.progress, "features   val"
    )
    feats = {"train": train_f, "train_labels": train_y, "val": val_f, "val_labels": val_y}
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save({"key": key, **feats}, tmp)
    tmp.replace(path)
    info["bytes"] = path.stat().st_size
    return feats, info


def _weights_identity(weights: str, seed: int) -> dict[str, Any]:
    if weights == "imagenet":
        return {"imagenet": "torchvision IMAGENET1K"}
    if weights == "none":
        # random initialisation: fixed by the seed (and the library's initialiser)
        return {"random": seed, "torch": torch.__version__.split("+")[0]}
    path = Path(weights)
    if path.is_dir():
        path = path / "weights.pt"
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"file_sha256": h.hexdigest()}


def _data_identity(cfg: TrainConfig, n_train: int, n_val: int) -> dict[str, Any]:
    ident: dict[str, Any] = {
        "source": cfg.dataset,
        "train_size": cfg.train_size,
        "val_size": cfg.val_size,
        "train_fraction": cfg.train_fraction,
        "val_fraction": cfg.val_fraction,
        "seed": cfg.seed,
        "n_train": n_train,
        "n_val": n_val,
    }
    if cfg.dataset not in ("shapes", "glyphs"):  # generated data has no directory
        root = Path(cfg.data_dir).resolve()
        ident["data_dir"] = str(root)
        if cfg.dataset == "folder":
            h = hashlib.sha256()
            for p in sorted(root.rglob("*")):
                if p.is_file():
                    st = p.stat()
                    h.update(f"{p.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
            ident["files"] = h.hexdigest()
    return ident


class PeakMemory:
    """Peak resident memory of this process while running (sampled every 50 ms), and on
    CUDA the peak allocated by PyTorch, in MiB."""

    def __init__(self, device: torch.device):
        self.device = device
        self._peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._result: dict[str, Any] | None = None

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._peak = _rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self._peak = max(self._peak, _rss_bytes())

    def stop(self) -> dict[str, Any]:
        if self._result is None:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            self._peak = max(self._peak, _rss_bytes())
            result: dict[str, Any] = {"peak_rss_mib": round(self._peak / 2**20, 1)}
            if self.device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(self.device)
                result["peak_cuda_mib"] = round(peak / 2**20, 1)
            self._result = result
        return self._result


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # not Linux: the lifetime peak, in KiB
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
