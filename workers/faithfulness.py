"""How far a map can be trusted: deletion and insertion curves (Petsiuk et al. 2018, RISE).

For one image, its explained target class and a map at the model's input resolution:

    order         the pixels ranked by the map, highest first (ties in a seeded random
                  order, so a flat map is no raster scan)
    deletion      the image with the first k/STEPS of that order removed, k = 0..STEPS:
                  each removed pixel takes the baseline's value (all channels)
    insertion     the baseline with the first k/STEPS of the order revealed (the image's
                  own pixels put back)
    baseline      "mean": the image's own per-channel mean colour, everywhere (the
                  default); "blur": the image blurred (Gaussian, sigma = side / 16)
    curves        the target's softmax probability on each perturbed image, batched
                  through the model without gradients (chunks of at most `chunk_size`
                  images, halved on CUDA out-of-memory like every other pass)
    AUC           the trapezoidal area under each curve over the removed/revealed
                  fraction [0, 1]
    random        the same two curves for a random pixel order (seeded, the same for
                  every method of an image), so that the numbers mean something

A faithful map has a deletion AUC below random (removing what it points at destroys the
prediction faster than removing random pixels) and an insertion AUC above random
(revealing it restores the prediction sooner).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from workers.engine import run_in_chunks

STEPS = 16
SEED = 0
BASELINES = ("mean", "blur")
DEFAULT_BASELINE = "mean"
BASELINE_TEXT = {
    "mean": "removed pixels take the image's own per-channel mean colour",
    "blur": "removed pixels take the Gaussian-blurred image's (sigma = side / 16)",
}
READING = (
    "lower deletion AUC than random: removing what the map points at destroys the "
    "prediction faster than removing random pixels; higher insertion AUC than random: "
    "revealing it restores the prediction sooner"
)


def describe(
    steps: int = STEPS, baseline: str = DEFAULT_BASELINE, seed: int = SEED
) -> dict[str, Any]:
    """The manifest's account of how the faithfulness numbers were measured."""
    return {
        "definition": "deletion and insertion curves (Petsiuk et al. 2018, RISE): the "
        "target class's softmax probability as the pixels the map ranks highest are "
        f"removed from the image, or revealed on the baseline, in {steps} equal steps; "
        "each AUC is the trapezoidal area under its curve over the fraction [0, 1]",
        "steps": steps,
        "baseline": baseline,
        "baseline_definition": BASELINE_TEXT[baseline],
        "random_order": f"the same curves for a random pixel order (torch seed {seed})",
        "reading": READING,
    }


def pixel_order(saliency: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flat pixel indices of the (H, W) map, highest value first; equal values in a
    random order drawn from `generator`."""
    flat = saliency.detach().flatten().float().cpu()
    shuffle = torch.randperm(flat.numel(), generator=generator)
    ranked = torch.argsort(flat[shuffle], descending=True, stable=True)
    return shuffle[ranked]


def random_order(n_pixels: int, seed: int = SEED) -> torch.Tensor:
    return torch.randperm(n_pixels, generator=torch.Generator().manual_seed(seed))


def make_baseline(x: torch.Tensor, kind: str = DEFAULT_BASELINE) -> torch.Tensor:
    """The (C, H, W) image that removed pixels are replaced with."""
    if kind == "mean":
        return x.mean(dim=(1, 2), keepdim=True).expand_as(x).clone()
    if kind == "blur":
        return gaussian_blur(x, sigma=max(1.0, x.shape[-1] / 16))
    raise ValueError(f"unknown baseline {kind!r}; choose from {', '.join(BASELINES)}")


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """(C, H, W) blurred per channel with a separable Gaussian, reflected at the edges."""
    radius = max(1, min(int(3 * sigma), min(x.shape[-2:]) - 1))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(t**2) / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).to(x.dtype)
    c = x.shape[0]
    y = F.pad(x[None], (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1).contiguous(), groups=c)
    y = F.conv2d(y, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1).contiguous(), groups=c)
    return y[0]


def perturbed(
    x: torch.Tensor, baseline: torch.Tensor, order: torch.Tensor, steps: int = STEPS
) -> tuple[torch.Tensor, torch.Tensor]:
    """(deletion, insertion) batches, each (steps + 1, C, H, W): step k removes (or
    reveals) the first round(k * H * W / steps) pixels of `order`."""
    _, h, w = x.shape
    n = h * w
    counts = [round(k * n / steps) for k in range(steps + 1)]
    rank = torch.empty(n, dtype=torch.long)
    rank[order] = torch.arange(n)
    # mask[k, p] is True when pixel p is among the first counts[k] of the order
    mask = rank[None, :] < torch.tensor(counts)[:, None]
    mask = mask.view(steps + 1, 1, h, w)
    deletion = torch.where(mask, baseline[None], x[None])
    insertion = torch.where(mask, x[None], baseline[None])
    return deletion, insertion


def target_probabilities(
    model: nn.Module,
    batch: torch.Tensor,
    target: int,
    chunk_size: int,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """The softmax probability of `target` for every image of `batch` (held on the CPU),
    without gradients, at most `chunk_size` images per forward pass."""

    def work(start: int, end: int) -> torch.Tensor:
        with torch.no_grad():
            logits = model(batch[start:end].to(device, non_blocking=True))
            return logits.float().softmax(dim=1)[:, target].cpu()

    parts = [p for _, _, p in run_in_chunks(work, int(batch.shape[0]), chunk_size)]
    return torch.cat(parts).numpy().astype(np.float64)


def auc(curve: np.ndarray) -> float:
    """Trapezoidal area under `curve`, its points evenly spaced over [0, 1]."""
    y = np.asarray(curve, dtype=np.float64)
    if y.size < 2:
        raise ValueError("a curve needs at least two points")
    return float(((y[:-1] + y[1:]) / 2).sum() / (y.size - 1))


def _curves(
    model: nn.Module,
    x: torch.Tensor,
    baseline: torch.Tensor,
    order: torch.Tensor,
    target: int,
    steps: int,
    chunk_size: int,
    device: torch.device | str,
) -> tuple[np.ndarray, np.ndarray]:
    deletion, insertion = perturbed(x, baseline, order, steps)
    # one batched pass (in chunks) over both curves of this map
    probs = target_probabilities(
        model, torch.cat([deletion, insertion]), target, chunk_size, device
    )
    return probs[: steps + 1], probs[steps + 1 :]


def score_maps(
    model: nn.Module,
    x: torch.Tensor,
    maps: Mapping[str, torch.Tensor],
    target: int,
    *,
    chunk_size: int,
    device: torch.device | str = "cpu",
    steps: int = STEPS,
    baseline: str = DEFAULT_BASELINE,
    seed: int = SEED,
) -> dict[str, dict[str, Any]]:
    """Per map name: its deletion and insertion AUCs, those of a random pixel order, and
    the curves. `x` is one preprocessed image (C, H, W) and every map is (H, W), at the
    model's input resolution; `model` must be in eval mode."""
    if model.training:
        raise ValueError("score_maps() needs the model in eval mode (call model.eval())")
    x = x.detach().float().cpu()
    h, w = x.shape[-2:]
    base = make_baseline(x, baseline)
    rnd_del, rnd_ins = _curves(
        model, x, base, random_order(h * w, seed), target, steps, chunk_size, device
    )
    common = {
        "random_deletion_auc": auc(rnd_del),
        "random_insertion_auc": auc(rnd_ins),
        "steps": steps,
        "baseline": baseline,
    }
    scores: dict[str, dict[str, Any]] = {}
    for name, saliency in maps.items():
        if tuple(saliency.shape[-2:]) != (h, w):
            raise ValueError(f"map {name!r} is {tuple(saliency.shape)}, not the input's {(h, w)}")
        # ties in the map are broken the same way for every method of the image
        order = pixel_order(saliency, torch.Generator().manual_seed(seed + 1))
        deletion, insertion = _curves(model, x, base, order, target, steps, chunk_size, device)
        scores[name] = {
            "deletion_auc": auc(deletion),
            "insertion_auc": auc(insertion),
            **common,
            "curves": {
                "deletion": _rounded(deletion),
                "insertion": _rounded(insertion),
                "random_deletion": _rounded(rnd_del),
                "random_insertion": _rounded(rnd_ins),
            },
        }
    return scores


def _rounded(curve: np.ndarray) -> list[float]:
    return [round(float(v), 6) for v in curve]
