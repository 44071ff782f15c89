"""workers.faithfulness on a hand-built model whose answer is known.

RegionModel's class-0 logit is an affine function of the mean of its input over one known
square region, the other class's logit is 0: only the region's pixels matter. On an image
that is 1 inside the region and 0 elsewhere, with the mean baseline, a map that points at
the region must beat a random order on both curves, and the inverted map must lose; with
16 steps and a region of exactly 1/16 of the pixels the AUCs are known in closed form.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from workers import faithfulness as fa

SIDE = 32
REGION = (slice(4, 12), slice(16, 24))  # 8 x 8 = 64 of 1024 pixels: 1/16


class RegionModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        mask = torch.zeros(SIDE, SIDE)
        mask[REGION] = 1.0
        self.register_buffer("mask", mask)
        self.batches: list[int] = []
        self.grad_enabled: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(int(x.shape[0]))
        self.grad_enabled.append(torch.is_grad_enabled())
        inside = (x.mean(dim=1) * self.mask).sum(dim=(1, 2)) / self.mask.sum()
        z = 8.0 * inside - 4.0  # full region: +4; the mean baseline (1/16): -3.5
        return torch.stack([z, torch.zeros_like(z)], dim=1)


def _image() -> torch.Tensor:
    x = torch.zeros(3, SIDE, SIDE)
    x[:, REGION[0], REGION[1]] = 1.0
    return x


def _p(z: float) -> float:
    return 1 / (1 + math.exp(-z))


@pytest.fixture
def scored() -> tuple[dict[str, dict[str, float]], RegionModel]:
    model = RegionModel().eval()
    pointing = torch.zeros(SIDE, SIDE)
    pointing[REGION] = 1.0
    pointing += 0.01 * torch.rand(SIDE, SIDE, generator=torch.Generator().manual_seed(3))
    maps = {"pointing": pointing, "inverted": -pointing, "flat": torch.zeros(SIDE, SIDE)}
    return fa.score_maps(model, _image(), maps, 0, chunk_size=5), model


def test_a_map_that_points_at_the_region_beats_random_and_the_inverted_map_loses(
    scored: tuple[dict[str, dict[str, float]], RegionModel],
) -> None:
    scores, _ = scored
    pointing, inverted = scores["pointing"], scores["inverted"]
    rnd_del, rnd_ins = pointing["random_deletion_auc"], pointing["random_insertion_auc"]
    assert pointing["deletion_auc"] < rnd_del < inverted["deletion_auc"]
    assert pointing["insertion_auc"] > rnd_ins > inverted["insertion_auc"]
    # random curves are the same for every map of the image
    assert inverted["random_deletion_auc"] == rnd_del
    assert pointing["steps"] == 16 and pointing["baseline"] == "mean"
    assert len(pointing["curves"]["deletion"]) == 17


def test_the_aucs_are_the_closed_form_ones(
    scored: tuple[dict[str, dict[str, float]], RegionModel],
) -> None:
    scores, _ = scored
    full, base = _p(4.0), _p(8.0 / 16 - 4.0)  # the mean image is 1/16 everywhere
    # pointing: step 1 removes exactly the region; inverted: only the last step does
    assert scores["pointing"]["deletion_auc"] == pytest.approx(
        (full + base) / 2 / 16 + base * 15 / 16, abs=1e-6
    )
    assert scores["inverted"]["deletion_auc"] == pytest.approx(
        full * 15 / 16 + (full + base) / 2 / 16, abs=1e-6
    )
    assert scores["pointing"]["insertion_auc"] == pytest.approx(
        (full + base) / 2 / 16 + full * 15 / 16, abs=1e-6
    )
    # a flat map is ranked by the seeded random tie-break: about as good as random
    flat = scores["flat"]
    assert abs(flat["deletion_auc"] - flat["random_deletion_auc"]) < 0.15


def test_batches_respect_the_chunk_size_and_run_without_gradients(
    scored: tuple[dict[str, dict[str, float]], RegionModel],
) -> None:
    _, model = scored
    # 4 curve pairs (random + 3 maps) of 2 x 17 images, in chunks of at most 5
    assert sum(model.batches) == 4 * 34
    assert max(model.batches) == 5
    assert not any(model.grad_enabled)


def test_pixel_order_ranks_highest_first_and_breaks_ties_by_seed() -> None:
    saliency = torch.tensor([[0.0, 3.0], [1.0, 3.0]])
    a = fa.pixel_order(saliency, torch.Generator().manual_seed(0))
    b = fa.pixel_order(saliency, torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    assert set(a[:2].tolist()) == {1, 3} and a[2:].tolist() == [2, 0]


def test_perturbation_removes_and_reveals_the_right_pixels() -> None:
    x = torch.arange(16.0).view(1, 4, 4)
    baseline = torch.full_like(x, -1.0)
    order = torch.arange(16).flip(0)  # last pixel first
    deletion, insertion = fa.perturbed(x, baseline, order, steps=4)
    assert deletion.shape == (5, 1, 4, 4)
    assert torch.equal(deletion[0], x) and torch.equal(insertion[-1], x)
    assert torch.equal(deletion[-1], baseline) and torch.equal(insertion[0], baseline)
    assert (deletion[1].flatten()[12:] == -1).all() and (deletion[1].flatten()[:12] >= 0).all()


def test_auc_and_baselines() -> None:
    assert fa.auc(np.array([1.0, 1.0, 1.0])) == pytest.approx(1.0)
    assert fa.auc(np.array([1.0, 0.0])) == pytest.approx(0.5)
    x = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))
    mean = fa.make_baseline(x, "mean")
    assert torch.allclose(mean[:, 0, 0], x.mean(dim=(1, 2)))
    blurred = fa.make_baseline(x, "blur")
    assert blurred.shape == x.shape and blurred.std() < x.std()
    with pytest.raises(ValueError, match="unknown baseline"):
        fa.make_baseline(x, "noise")
    assert "lower deletion AUC than random" in fa.describe()["reading"]
