"""The engine: per-item targets, one fused pass, hooks released on every path, chunking."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lantern.core.errors import JobError
from models.data import draw_shape
from models.network import build_model
from workers.engine import (
    LayerCapture,
    explain,
    explain_in_chunks,
    fold_batchnorm,
    normalise,
    run_in_chunks,
)
from workers.methods import Activations, GradCAM, GradCAMPlusPlus, Saliency

ALL = ("gradcam", "gradcam_pp", "saliency", "activations")


def methods(*names: str, layer: str = "layer4", act_layer: str = "layer3") -> list:
    table = {
        "gradcam": lambda: GradCAM(layer),
        "gradcam_pp": lambda: GradCAMPlusPlus(layer),
        "saliency": lambda: Saliency(),
        "activations": lambda: Activations(act_layer),
    }
    return [table[n]() for n in names]


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return build_model("resnet18", 4, weights="none").eval()


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(4, 3, 64, 64)


@pytest.fixture(scope="module")
def resnet64(resnet: nn.Module) -> nn.Module:
    """The same network in float64, where a batch's maps can be compared with each image's
    alone: in float32 the kernels a CPU picks depend on the batch size (AVX2, AVX-512, AMX),
    and an input gradient through ReLUs flips a gate wherever rounding crosses zero (on an
    AMD EPYC with AVX-512, 0.1 of a saliency map's own value in 145 of 4,096 pixels)."""
    import copy

    return copy.deepcopy(resnet).double()


def assert_same_maps(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal to float64 rounding, relative to the maps' largest value."""
    scale = expected.abs().max()
    torch.testing.assert_close(got / scale, expected / scale, atol=1e-10, rtol=0)


def hooks_left(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks)
        + len(m._forward_pre_hooks)
        + len(m._backward_hooks)
        + len(m._backward_pre_hooks)
        for m in model.modules()
    )


def test_targets_are_per_item_in_a_mixed_batch(resnet64: nn.Module, batch: torch.Tensor) -> None:
    targets = [3, None, 0, None]
    batch = batch.double()
    ex = explain(resnet64, batch, methods("gradcam", "saliency"), targets)
    with torch.no_grad():
        top1 = resnet64(batch).argmax(dim=1)
    assert ex.targets.tolist() == [3, int(top1[1]), 0, int(top1[3])]
    # Each image's maps are those of its own target, as if it were explained alone.
    for i, t in enumerate(targets):
        alone = explain(resnet64, batch[i : i + 1], methods("gradcam", "saliency"), [t])
        for name in ("gradcam", "saliency"):
            assert_same_maps(ex.results[name].maps[i], alone.results[name].maps[0])
    # and a different target gives a different map for the same image
    other = explain(resnet64, batch[:1], methods("gradcam"), [1])
    assert not torch.allclose(other.results["gradcam"].maps[0], ex.results["gradcam"].maps[0])


def test_target_out_of_range_is_a_readable_error(resnet: nn.Module, batch: torch.Tensor) -> None:
    with pytest.raises(JobError, match="target class 7 does not exist: the model has 4"):
        explain(resnet, batch[:2], methods("gradcam"), [None, 7])
    assert hooks_left(resnet) == 0


def test_fused_pass_equals_separate_passes(resnet: nn.Module, batch: torch.Tensor) -> None:
    fused = explain(resnet, batch, methods(*ALL), [None, 2, None, 1])
    for name in ALL:
        alone = explain(resnet, batch, methods(name), [None, 2, None, 1])
        torch.testing.assert_close(fused.results[name].maps, alone.results[name].maps)
        for key, value in alone.results[name].extras.items():
            torch.testing.assert_close(fused.results[name].extras[key], value)


def test_one_forward_and_one_backward_serve_all_methods(batch: torch.Tensor) -> None:
    torch.manual_seed(0)
    inner = build_model("resnet18", 4, weights="none").eval()
    calls = {"forward": 0, "backward": 0}

    class Counting(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            calls["forward"] += 1
            out = self.net(x)

            def count(grad: torch.Tensor) -> None:
                calls["backward"] += 1

            out.register_hook(count)
            return out

    explain(Counting().eval(), batch, methods(*ALL, layer="net.layer4", act_layer="net.layer2"))
    assert calls == {"forward": 1, "backward": 1}


def test_hooks_are_released_after_success(resnet: nn.Module, batch: torch.Tensor) -> None:
    explain(resnet, batch, methods(*ALL))
    assert hooks_left(resnet) == 0


def test_hooks_are_released_after_an_error_in_the_forward_pass(batch: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", 4, weights="none").eval()

    class Boom(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("boom after layer4")

    model.avgpool = Boom()  # runs right after the hooked layer4
    with pytest.raises(RuntimeError, match="boom after layer4"):
        explain(model, batch, methods(*ALL))
    assert hooks_left(model) == 0


def test_hooks_are_released_after_an_error_in_a_method(
    resnet: nn.Module, batch: torch.Tensor
) -> None:
    class Broken(GradCAM):
        name = "broken"

        def compute(self, p):  # type: ignore[no-untyped-def]
            raise ValueError("method failed mid-pass")

    with pytest.raises(ValueError, match="method failed mid-pass"):
        explain(resnet, batch, [Saliency(), Broken("layer4")])
    assert hooks_left(resnet) == 0


def test_layer_capture_releases_hooks_and_tensors(resnet: nn.Module, batch: torch.Tensor) -> None:
    capture = LayerCapture(resnet, ["layer2", "layer4"])
    with pytest.raises(KeyError), capture:
        assert hooks_left(resnet) == 2
        with torch.no_grad():
            resnet(batch)
        assert set(capture.outputs) == {"layer2", "layer4"}
        raise KeyError("escapes unchanged")
    assert hooks_left(resnet) == 0 and capture.outputs == {}


def test_unknown_layer_is_a_readable_error(resnet: nn.Module, batch: torch.Tensor) -> None:
    with pytest.raises(JobError, match=r"no layer 'layer9'.*'layer4'"):
        explain(resnet, batch, methods("gradcam", layer="layer9"))
    assert hooks_left(resnet) == 0


@pytest.mark.parametrize("layer", ["fc", "avgpool"])
def test_a_layer_that_is_no_feature_map_is_a_readable_error(
    resnet: nn.Module, batch: torch.Tensor, layer: str
) -> None:
    """Whatever the bundle records: `fc` (N, classes) used to end in an IndexError."""
    with pytest.raises(JobError, match=rf"layer '{layer}' is not a convolutional feature map"):
        explain(resnet, batch[:1], methods("gradcam", "activations", layer=layer, act_layer=layer))
    assert hooks_left(resnet) == 0


def test_chunks_give_the_same_maps_as_one_batch(resnet64: nn.Module, batch: torch.Tensor) -> None:
    targets = [1, None, 3, None]
    batch = batch.double()
    whole = explain(resnet64, batch, methods(*ALL), targets)
    parts = list(explain_in_chunks(resnet64, batch, methods(*ALL), targets, chunk_size=3))
    assert [(s, e) for s, e, _ in parts] == [(0, 3), (3, 4)]
    for name in ALL:
        joined = torch.cat([ex.results[name].maps for _, _, ex in parts])
        assert_same_maps(joined, whole.results[name].maps)


def test_out_of_memory_halves_the_chunk_and_the_work_goes_on() -> None:
    tried: list[int] = []

    def work(start: int, end: int) -> list[int]:
        tried.append(end - start)
        if end - start > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return list(range(start, end))

    done = [i for _, _, items in run_in_chunks(work, 7, chunk_size=8) for i in items]
    assert done == list(range(7))
    assert tried == [7, 4, 2, 2, 2, 1]  # chunk size 8 -> 4 -> 2, then kept

    def always(start: int, end: int) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.OutOfMemoryError):
        list(run_in_chunks(always, 3, chunk_size=4))


def test_normalise_scales_each_map_to_unit_range() -> None:
    maps = torch.tensor([[[0.0, 2.0], [1.0, 4.0]], [[3.0, 3.0], [3.0, 3.0]]])
    unit = normalise(maps)
    torch.testing.assert_close(unit[0], torch.tensor([[0.0, 0.5], [0.25, 1.0]]))
    assert unit[1].eq(0).all()  # a flat map has no hot spot


def test_gradcam_and_saliency_point_at_the_shape() -> None:
    """Localisation sanity: a brightness detector's maps peak on the drawn shape."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 1, 3, padding=1)
    with torch.no_grad():
        conv.weight.fill_(1 / 27)
        conv.bias.fill_(-0.45)  # shapes are drawn at >= 130/255, backgrounds <= 90/255
    fc = nn.Linear(1, 2)
    model = nn.Sequential()
    model.add_module("features", nn.Sequential(conv, nn.ReLU()))
    model.add_module("pool", nn.AdaptiveAvgPool2d(1))
    model.add_module("flat", nn.Flatten())
    model.add_module("fc", fc)
    with torch.no_grad():
        fc.weight.copy_(torch.tensor([[1.0], [-1.0]]))
        fc.bias.zero_()
    model.eval()
    samples = [draw_shape(i, size=64) for i in range(4)]
    x = torch.stack(
        [
            torch.from_numpy(__import__("numpy").asarray(s.image, dtype="float32") / 255).permute(
                2, 0, 1
            )
            for s in samples
        ]
    )
    ex = explain(model, x, [GradCAM("features"), Saliency()], targets=[0] * 4)
    for i, s in enumerate(samples):
        left, top, right, bottom = s.box
        for name in ("gradcam", "saliency"):
            m = ex.results[name].maps[i]
            y, xx = divmod(int(m.argmax()), m.shape[1])
            assert left - 1 <= xx <= right and top - 1 <= y <= bottom, (name, i, (xx, y), s.box)
            inside = m[max(0, top - 1) : bottom + 1, max(0, left - 1) : right + 1].sum()
            assert inside / m.sum() > 0.9, (name, i)


def _relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest per-image ||a - b|| / ||a||: how far apart two maps are as pictures."""
    dims = tuple(range(1, a.dim()))
    return float(((a - b).double().norm(dim=dims) / a.double().norm(dim=dims)).max())


def test_folding_batchnorm_is_exact_in_float64(resnet: nn.Module, batch: torch.Tensor) -> None:
    """The proof that folding changes nothing: in float64 every logit and every map agrees
    to rounding (1e-15 measured). float32 cannot prove it: an input gradient through
    ReLUs flips a gate wherever rounding crosses zero, and where that happens depends on
    the CPU's kernels (AVX2, AVX-512, AMX)."""
    import copy

    exact = copy.deepcopy(resnet).double()
    folded = fold_batchnorm(copy.deepcopy(resnet).double())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert {n for n, _ in folded.named_modules()} == {n for n, _ in resnet.named_modules()}
    a = explain(exact, batch.double(), methods(*ALL))
    b = explain(folded, batch.double(), methods(*ALL))
    torch.testing.assert_close(b.logits, a.logits, atol=1e-10, rtol=1e-10)
    for name in ALL:
        assert_same_maps(b.results[name].maps, a.results[name].maps)


def test_folding_batchnorm_keeps_float32_predictions_and_maps_as_a_user_sees_them(
    resnet: nn.Module, batch: torch.Tensor
) -> None:
    """In float32, what the worker runs, predictions agree and every map stays the same
    picture: relative L2 error under 2 % (measured on an Intel Xeon with AVX-512 and AMX:
    0.18 % for saliency, the worst method, whose largest element-wise difference there is
    0.6 % of its maximum; the other methods agree to 1e-6)."""
    import copy

    folded = fold_batchnorm(copy.deepcopy(resnet))
    a = explain(resnet, batch, methods(*ALL))
    b = explain(folded, batch, methods(*ALL))
    torch.testing.assert_close(b.logits, a.logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(b.logits.argmax(1), a.logits.argmax(1))
    for name in ALL:
        assert _relative_l2(a.results[name].maps, b.results[name].maps) < 0.02, name


def test_display_normalisation_can_clip_at_a_quantile() -> None:
    from workers.engine import normalise

    maps = torch.zeros(2, 10, 10)
    maps[0, 0, 0] = 1000.0  # one extreme pixel
    maps[0, 1:, :] = torch.linspace(0, 1, 90).view(9, 10)
    maps[1] = 3.0  # constant
    full = normalise(maps)
    clipped = normalise(maps, quantile=0.9)
    assert full[0].max() == 1 and full[0, 5].max() < 0.01  # the outlier squashes the rest
    assert clipped[0, 0, 0] == 1 and clipped.max() <= 1 and clipped.min() >= 0
    assert clipped[0, 5].max() > 0.4  # the ordinary values stay visible
    assert torch.equal(clipped[1], torch.zeros(10, 10))
