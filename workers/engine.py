"""The explanation engine: one forward and one backward pass serve every requested method.

    explain(model, x, methods, targets)
        LayerCapture      forward hooks keep the outputs of the layers the methods name;
                          released on every path, errors included
        forward           x requires grad when any method needs a gradient
        targets           per image: the class asked for, else that image's own top-1
        backward          ONE torch.autograd.grad of the sum of the selected logits, with
                          respect to exactly the tensors the methods need (layer outputs,
                          the input). The images of an eval-mode batch are independent, so
                          each image's gradient is that of its own target score.
        methods           each turns the shared PassOutputs into one raw map per image

    explain_top_classes(model, x, methods, k)
                          the same for each image's k most probable classes: ONE forward,
                          then k gradients of the k target scores over the one retained
                          graph (retain_graph), one Explanation per rank

    explain_in_chunks(...)  large batches in chunks; a CUDA out-of-memory error halves the
                          chunk and the work goes on.

Why k backward passes over one graph for top-k, not `autograd.grad(is_grads_batched=True)`:
both give the same tensors (checked bit for bit on a BatchNorm-folded ResNet-18), but the
batched form runs the backward under vmap, which falls back to a slow per-sample loop for
ops without a batching rule, and on a CPU it was no faster (8 images at 128 px, k=3, one
thread: 0.47 s batched, 0.43 s k backwards, 0.67 s k separate forward+backward passes).

Backward hooks are not needed: asking autograd for the gradient of the captured layer
output gives the same tensor, and, unlike `loss.backward()`, computes no parameter
gradients at all.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from lantern.core.errors import JobError
from models.export import is_feature_map_module
from workers.methods.base import ExplanationMethod, MethodResult, PassOutputs

log = logging.getLogger(__name__)
T = TypeVar("T")


class LayerCapture:
    """Forward hooks on named sub-modules that keep each one's latest output.

    A context manager: on exit, normal or not, every hook is removed and every captured
    tensor dropped; exceptions propagate unchanged.
    """

    def __init__(self, model: nn.Module, layers: Iterable[str]):
        modules = dict(model.named_modules())
        names = sorted(set(layers))
        missing = [n for n in names if n not in modules or n == ""]
        if missing:
            raise JobError(
                f"the model has no layer {', '.join(map(repr, missing))}; "
                f"convolutional stages include {', '.join(_layer_examples(model))}"
            )
        pooled = [n for n in names if not is_feature_map_module(modules[n])]
        if pooled:
            raise JobError(
                f"layer {pooled[0]!r} is not a convolutional feature map (it pools globally); "
                f"convolutional stages include {', '.join(_layer_examples(model))}"
            )
        self._modules = {n: modules[n] for n in names}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self.outputs: dict[str, torch.Tensor] = {}

    def __enter__(self) -> LayerCapture:
        try:
            for name, module in self._modules.items():
                self._handles.append(module.register_forward_hook(self._keeper(name)))
        except BaseException:
            self.release()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def _keeper(self, name: str) -> Callable[[nn.Module, object, object], None]:
        def keep(module: nn.Module, inputs: object, output: object) -> None:
            if not isinstance(output, torch.Tensor):
                raise JobError(f"layer {name!r} does not output a single tensor")
            if output.dim() != 4:
                raise JobError(
                    f"layer {name!r} is not a convolutional feature map: its output has "
                    f"shape {tuple(output.shape)}, not (N, C, H, W)"
                )
            self.outputs[name] = output

        return keep

    def release(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.outputs.clear()


def _layer_examples(model: nn.Module) -> list[str]:
    names = [n for n, m in model.named_children() if any(True for _ in m.modules())]
    return [repr(n) for n in names if n.startswith(("layer", "features", "conv"))][:8] or [
        repr(n) for n in names[:8]
    ]


@dataclass
class Explanation:
    """A batch's predictions, the targets used, and each method's raw maps."""

    logits: torch.Tensor  # (N, classes)
    targets: torch.Tensor  # (N,)
    results: dict[str, MethodResult]
    input_size: tuple[int, int]  # (H, W) of the model input

    @property
    def probabilities(self) -> torch.Tensor:
        return self.logits.softmax(dim=1)

    def upsampled(self, method: str) -> torch.Tensor:
        """The raw maps of `method` at the model's input resolution, (N, H, W)."""
        return upsample(self.results[method].maps, self.input_size)

    def to(self, device: torch.device | str) -> Explanation:
        return Explanation(
            self.logits.to(device),
            self.targets.to(device),
            {
                k: MethodResult(r.maps.to(device), {e: v.to(device) for e, v in r.extras.items()})
                for k, r in self.results.items()
            },
            self.input_size,
        )


UPSAMPLING = (
    "bilinear (torch.nn.functional.interpolate, align_corners=False); none when the map "
    "is already at the input size"
)


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, h, w) -> (N, H, W), bilinear (UPSAMPLING); unchanged when already that size."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[:, None].float(), size=size, mode="bilinear", align_corners=False)[
        :, 0
    ]


def normalise(maps: torch.Tensor, quantile: float = 1.0) -> torch.Tensor:
    """Each map scaled to [0, 1] on its own, between its minimum and its `quantile`
    (values above it are clipped to 1); a constant map becomes all zeros."""
    flat = maps.flatten(1).float()
    lo = flat.min(dim=1, keepdim=True).values
    if quantile >= 1.0:
        hi = flat.max(dim=1, keepdim=True).values
    else:
        hi = torch.quantile(flat, quantile, dim=1, keepdim=True)
        hi = torch.where(hi > lo, hi, flat.max(dim=1, keepdim=True).values)
    span = hi - lo
    scaled = torch.where(span > 0, (flat - lo) / span.clamp_min(1e-12), torch.zeros_like(flat))
    return scaled.clamp_(0.0, 1.0).view_as(maps)


def resolve_targets(logits: torch.Tensor, targets: Sequence[int | None] | None) -> torch.Tensor:
    """Per image: the class asked for, or its own top-1 prediction."""
    n, classes = logits.shape
    top1 = logits.argmax(dim=1)
    if targets is None:
        return top1
    if len(targets) != n:
        raise JobError(f"{len(targets)} targets for a batch of {n} images")
    for t in targets:
        if t is not None and not 0 <= t < classes:
            raise JobError(f"target class {t} does not exist: the model has {classes} classes")
    asked = torch.tensor([-1 if t is None else t for t in targets], device=logits.device)
    return torch.where(asked >= 0, asked, top1)


def explain(
    model: nn.Module,
    inputs: torch.Tensor,
    methods: Sequence[ExplanationMethod],
    targets: Sequence[int | None] | None = None,
) -> Explanation:
    """Every method's maps for the batch `inputs` (N, C, H, W) from one forward and one
    backward pass. `model` must be in eval mode: training-mode BatchNorm would mix the
    images of a batch, and each image's explanation must depend on that image alone."""
    return _explain(model, inputs, methods, lambda logits: [resolve_targets(logits, targets)])[0]


def top_classes(logits: torch.Tensor, k: int) -> torch.Tensor:
    """(N, k): each image's k most probable classes, most probable first."""
    classes = int(logits.shape[1])
    if not 1 <= k <= classes:
        raise JobError(f"cannot compare the top {k} classes: the model has {classes} classes")
    return logits.topk(k, dim=1).indices


def explain_top_classes(
    model: nn.Module,
    inputs: torch.Tensor,
    methods: Sequence[ExplanationMethod],
    k: int,
) -> list[Explanation]:
    """One Explanation per rank r (0 .. k-1): every method's maps for each image's
    (r+1)-th most probable class, from ONE forward pass and k gradients of the k target
    scores over its retained graph (see the module doc). Rank 0 is what `explain` gives
    with no targets."""
    return _explain(
        model, inputs, methods, lambda logits: list(top_classes(logits, k).unbind(dim=1))
    )


def _explain(
    model: nn.Module,
    inputs: torch.Tensor,
    methods: Sequence[ExplanationMethod],
    choose_targets: Callable[[torch.Tensor], list[torch.Tensor]],
) -> list[Explanation]:
    """One forward pass; then, for each (N,) target tensor `choose_targets(logits)` gives,
    one gradient of the sum of those targets' logits (the graph kept until the last) and
    every method's maps from it."""
    if model.training:
        raise ValueError("explain() needs the model in eval mode (call model.eval())")
    if not methods:
        raise ValueError("no explanation methods requested")
    layer_grads = sorted({m.layer for m in methods if m.needs_layer_gradient and m.layer})
    want_input_grad = any(m.needs_input_gradient for m in methods)
    any_grad = want_input_grad or bool(layer_grads)

    x = inputs.detach().requires_grad_(any_grad)
    layers = {name for m in methods for name in m.layers_read}
    input_size = (int(inputs.shape[-2]), int(inputs.shape[-1]))
    explanations = []
    with LayerCapture(model, layers) as capture, torch.set_grad_enabled(any_grad):
        logits = model(x)
        target_sets = choose_targets(logits.detach())
        missing = layers - capture.outputs.keys()
        if missing:
            raise JobError(f"layer(s) {sorted(missing)} did not run in the forward pass")
        activations = {name: t.detach() for name, t in capture.outputs.items()}
        wrt = [capture.outputs[name] for name in layer_grads] + ([x] if want_input_grad else [])
        for rank, target_index in enumerate(target_sets):
            gradients: dict[str, torch.Tensor] = {}
            input_gradient = None
            if any_grad:
                score = logits.gather(1, target_index[:, None]).sum()
                grads = torch.autograd.grad(score, wrt, retain_graph=rank < len(target_sets) - 1)
                gradients = dict(zip(layer_grads, grads[: len(layer_grads)], strict=True))
                input_gradient = grads[-1] if want_input_grad else None
            outputs = PassOutputs(
                inputs=x.detach(),
                logits=logits.detach(),
                targets=target_index,
                activations=activations,
                gradients=gradients,
                input_gradient=input_gradient,
            )
            with torch.no_grad():
                results = {m.name: m.compute(outputs) for m in methods}
            explanations.append(Explanation(outputs.logits, target_index, results, input_size))
    return explanations


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every eval-mode BatchNorm that directly follows a convolution into it, in place.

    Outputs, and so every map, stay the same up to float rounding, while each pass skips
    a BatchNorm forward and backward per convolution (~5% of a ResNet-50 pass on a CPU).
    Covers torchvision ResNets (`convN`/`bnN` pairs, `downsample` = conv, bn); the folded
    BatchNorms become Identity, so every layer name still resolves. One visible effect:
    the activations of a named convolution now include its BatchNorm.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    if model.training:
        raise ValueError("fold_batchnorm() needs the model in eval mode")
    for module in list(model.modules()):
        pairs = [(f"conv{i}", f"bn{i}") for i in range(1, 10)]
        for conv_name, bn_name in pairs:
            conv, bn = getattr(module, conv_name, None), getattr(module, bn_name, None)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                setattr(module, conv_name, fuse_conv_bn_eval(conv, bn))
                setattr(module, bn_name, nn.Identity())
        down = getattr(module, "downsample", None)
        if (
            isinstance(down, nn.Sequential)
            and len(down) == 2
            and isinstance(down[0], nn.Conv2d)
            and isinstance(down[1], nn.BatchNorm2d)
        ):
            down[0] = fuse_conv_bn_eval(down[0], down[1])
            down[1] = nn.Identity()
    return model


def run_in_chunks(
    work: Callable[[int, int], T], total: int, chunk_size: int
) -> Iterator[tuple[int, int, T]]:
    """(start, end, work(start, end)) over [0, total) in chunks of at most `chunk_size`.

    On a CUDA out-of-memory error the chunk is halved and retried; at one image the error
    propagates. The smaller size is kept for the rest of the run.
    """
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    start, size = 0, chunk_size
    while start < total:
        end = min(total, start + size)
        try:
            result = work(start, end)
        except torch.OutOfMemoryError:
            if end - start <= 1:
                raise
            size = max(1, size // 2)
            log.warning("CUDA out of memory on %d images; retrying with %d", end - start, size)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        yield start, end, result
        start = end


def explain_in_chunks(
    model: nn.Module,
    inputs: torch.Tensor,
    methods: Sequence[ExplanationMethod],
    targets: Sequence[int | None] | None,
    chunk_size: int,
    device: torch.device | str = "cpu",
) -> Iterator[tuple[int, int, Explanation]]:
    """`explain` over a large batch held on the CPU, chunk by chunk on `device`; each
    chunk's results come back on the CPU."""
    n = int(inputs.shape[0])
    all_targets = list(targets) if targets is not None else [None] * n

    def work(start: int, end: int) -> Explanation:
        chunk = inputs[start:end].to(device, non_blocking=True)
        return explain(model, chunk, methods, all_targets[start:end]).to("cpu")

    yield from run_in_chunks(work, n, chunk_size)


def explain_top_classes_in_chunks(
    model: nn.Module,
    inputs: torch.Tensor,
    methods: Sequence[ExplanationMethod],
    k: int,
    chunk_size: int,
    device: torch.device | str = "cpu",
) -> Iterator[tuple[int, int, list[Explanation]]]:
    """`explain_top_classes` chunk by chunk, as `explain_in_chunks`."""

    def work(start: int, end: int) -> list[Explanation]:
        chunk = inputs[start:end].to(device, non_blocking=True)
        return [ex.to("cpu") for ex in explain_top_classes(model, chunk, methods, k)]

    yield from run_in_chunks(work, int(inputs.shape[0]), chunk_size)
