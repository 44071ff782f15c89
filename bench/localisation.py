"""Localisation: do the maps point at the object? Every method on generated shapes with known boxes.

    .venv/bin/python -m bench.localisation [--size 128] [--test 200] [--faith 48]

The model: a ResNet-18 (random initialisation, nothing downloaded) trained here on the
generated `shapes` task (models.data.draw_shape, seed 0) at --size pixels, so that the
layer-4 map is size/32 cells a side (4 x 4 at 128 px); the weights are cached under
--cache and reused by the next run with the same settings. The held-out images come from
another seed (1), each with its object's bounding box. Images are fed as generated (no
resize or crop), so a box is in input pixels.

Every contender is computed by Lantern's own engine (workers.engine.explain on the
BatchNorm-folded model, as the worker does) for the image's true class, and upsampled to
the input as the worker does (bilinear, align_corners=False). Per contender:

    pointing      the fraction of images whose map peak (argmax of the upsampled map)
                  lies inside the object's box grown by --tolerance pixels on each side
                  (default 0: strict, inside the box itself; the pointing game of Zhang
                  et al. 2016 allows 15 px at 224 px, 8.6 px at 128); a map with no
                  positive value is a miss
    energy        the fraction of the upsampled map's positive mass inside the box
    deletion,     workers.faithfulness AUCs (mean baseline, 16 steps) on the first --faith
    insertion     images; lower deletion and higher insertion are better
    random        a uniformly random map: pointing and energy are the box's share of the
                  image (exact expectation); deletion and insertion those of the random
                  pixel order workers.faithfulness scores beside every map

With pytorch-grad-cam installed (the `bench` extra) Lantern's LayerCAM is also compared
with pytorch-grad-cam's LayerCAM on the same weights (Pearson r of the upsampled maps).
The Markdown table goes to stdout (and to --out, if given).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.data import SHAPES, draw_shape
from models.network import build_model
from workers import faithfulness
from workers.engine import explain, fold_batchnorm, normalise
from workers.methods import (
    Activations,
    ExplanationMethod,
    GradCAM,
    GradCAMPlusPlus,
    LayerCAM,
    Saliency,
)

MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
TRAIN_SEED, TEST_SEED = 0, 1


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=128, help="image size in pixels")
    p.add_argument(
        "--arch", default="narrow", choices=["narrow", "resnet18", "resnet34", "resnet50"]
    )
    p.add_argument("--train", type=int, default=3000, help="training images")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--test", type=int, default=200, help="held-out images")
    p.add_argument("--faith", type=int, default=48, help="images scored for deletion/insertion")
    p.add_argument("--tolerance", type=int, default=0, help="pointing-game tolerance, pixels")
    p.add_argument("--cache", type=Path, default=Path("/tmp/lantern-localisation"))
    p.add_argument("--out", type=Path, default=None, help="also write the table here")
    return p


# --- data and model ----------------------------------------------------------------------


def to_input(images: Sequence[object]) -> torch.Tensor:
    """PIL images -> the normalised float batch (N, 3, H, W)."""
    arr = np.stack([np.asarray(im, dtype=np.uint8) for im in images])
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255
    return (x - MEAN) / STD


def shapes(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs, labels, boxes (N, 4) as left, top, right, bottom) of n generated images."""
    samples = [draw_shape(i, size, seed) for i in range(n)]
    x = to_input([s.image for s in samples])
    labels = torch.tensor([s.label for s in samples])
    boxes = torch.tensor([s.box for s in samples])
    return x, labels, boxes


class NarrowResNet(nn.Module):
    """ResNet-18's layout (stem, maxpool, layer1-4 of two BasicBlocks, strides 4-8-16-32,
    global pooling, fc) at 1/4 of its widths (`width`, 2x, 4x, 8x instead of 64 ... 512):
    the same stages and map sizes for 1/16 of the compute, trainable in minutes on two
    CPU cores. Layer names as torchvision's, so the engine and BatchNorm folding apply."""

    def __init__(self, num_classes: int = len(SHAPES), width: int = 16):
        super().__init__()
        from torchvision.models.resnet import BasicBlock

        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        stages, inplanes = [], width
        for i, stride in enumerate((1, 2, 2, 2)):
            planes = width * 2**i
            down = None
            if stride != 1 or inplanes != planes:
                down = nn.Sequential(
                    nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False),
                    nn.BatchNorm2d(planes),
                )
            stages.append(
                nn.Sequential(
                    BasicBlock(inplanes, planes, stride, down), BasicBlock(planes, planes)
                )
            )
            inplanes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


def make_model(arch: str) -> nn.Module:
    """'narrow' (NarrowResNet, width 16), 'narrow-<width>', or a torchvision ResNet."""
    if arch == "narrow" or arch.startswith("narrow-"):
        return NarrowResNet(width=int(arch.partition("-")[2] or 16))
    return build_model(arch, len(SHAPES), weights="none")


def train_model(
    arch: str, size: int, n: int, epochs: int, seed: int = TRAIN_SEED, log: bool = True
) -> nn.Module:
    """`arch` from random initialisation, trained on n generated shapes (AdamW, one-cycle)."""
    torch.manual_seed(seed)
    model = make_model(arch)
    x, y, _ = shapes(n, size, seed)
    batch = 64
    steps = epochs * ((n + batch - 1) // batch)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    model.train()
    start = time.perf_counter()
    for epoch in range(epochs):
        perm = torch.randperm(n)
        correct = 0
        for i in range(0, n, batch):
            idx = perm[i : i + batch]
            xb = x[idx]
            if torch.rand(()) < 0.5:  # horizontal flips keep the class and mirror the box
                xb = xb.flip(-1)
            out = model(xb)
            loss = F.cross_entropy(out, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            correct += int((out.argmax(1) == y[idx]).sum())
        if log:
            print(
                f"  epoch {epoch + 1}/{epochs}: train accuracy {correct / n:.3f} "
                f"({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
    return model.eval()


def cached_model(args: argparse.Namespace) -> nn.Module:
    key = {"arch": args.arch, "size": args.size, "train": args.train, "epochs": args.epochs}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    path = args.cache / f"{args.arch}-{args.size}px-{digest}.pt"
    if path.exists():
        print(f"model: {path} (cached)")
        model = make_model(args.arch)
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval()
    print(f"training {args.arch} at {args.size} px on {args.train} shapes, {args.epochs} epochs")
    model = train_model(args.arch, args.size, args.train, args.epochs)
    args.cache.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    print(f"model: {path}")
    return model


# --- scores ------------------------------------------------------------------------------


def box_masks(boxes: torch.Tensor, size: int, grow: int = 0) -> torch.Tensor:
    """(N, size, size) bool: the pixels of each box (inclusive), grown by `grow` px."""
    r = torch.arange(size)
    left, top, right, bottom = (boxes[:, i, None] for i in range(4))
    cols = (r >= left - grow) & (r <= right + grow)  # (N, size)
    rows = (r >= top - grow) & (r <= bottom + grow)
    return rows[:, :, None] & cols[:, None, :]


def pointing(maps: torch.Tensor, boxes: torch.Tensor, tolerance: int) -> torch.Tensor:
    """(N,) bool: the peak of each (N, H, W) map lies in its box grown by `tolerance`;
    a map without a positive value misses."""
    h = maps.shape[1]
    flat = maps.flatten(1)
    peak = flat.argmax(dim=1)
    inside = box_masks(boxes, h, tolerance).flatten(1)
    hit = inside.gather(1, peak[:, None])[:, 0]
    return hit & (flat.amax(dim=1) > 0)


def energy(maps: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """(N,) the share of each map's positive mass inside its box (0 for an empty map)."""
    pos = maps.clamp_min(0).flatten(1).double()
    inside = (pos * box_masks(boxes, maps.shape[-1]).flatten(1)).sum(1)
    total = pos.sum(1)
    return torch.where(total > 0, inside / total.clamp_min(1e-300), torch.zeros_like(total))


# --- contenders --------------------------------------------------------------------------


@dataclass
class Contender:
    name: str
    note: str
    maps: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]  # -> (N, H, W)


def engine_maps(method: ExplanationMethod) -> Callable[..., torch.Tensor]:
    def run(model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        ex = explain(model, x, [method], targets.tolist())
        return ex.upsampled(method.name).float()

    return run


def fused_layercam(layers: Sequence[str]) -> Callable[..., torch.Tensor]:
    """The mean of the layers' LayerCAM maps, each upsampled and scaled to [0, 1]
    (pytorch-grad-cam's multi-layer aggregation)."""

    def run(model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        maps = [engine_maps(LayerCAM(layer))(model, x, targets) for layer in layers]
        return torch.stack([normalise(m) for m in maps]).mean(0)

    return run


def smoothgrad(samples: int = 16, sigma: float = 0.15) -> Callable[..., torch.Tensor]:
    """SmoothGrad (Smilkov et al. 2017) of the saliency map: the mean over `samples`
    copies with Gaussian noise of `sigma` x the input's value range."""

    def run(model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        gen = torch.Generator().manual_seed(0)
        span = (x.amax(dim=(1, 2, 3)) - x.amin(dim=(1, 2, 3)))[:, None, None, None]
        total = torch.zeros(x.shape[0], *x.shape[-2:])
        for _ in range(samples):
            noisy = x + torch.randn(x.shape, generator=gen) * sigma * span
            total += explain(model, noisy, [Saliency()], targets.tolist()).upsampled("saliency")
        return total / samples

    return run


CONTENDERS = [
    Contender("gradcam layer4", "textbook Grad-CAM, the baseline", engine_maps(GradCAM("layer4"))),
    Contender("gradcam_pp layer4", "", engine_maps(GradCAMPlusPlus("layer4"))),
    Contender("layercam layer4", "", engine_maps(LayerCAM("layer4"))),
    Contender("gradcam layer3", "", engine_maps(GradCAM("layer3"))),
    Contender("layercam layer3", "", engine_maps(LayerCAM("layer3"))),
    Contender("layercam layer2", "", engine_maps(LayerCAM("layer2"))),
    Contender("layercam layer2+3+4", "fused", fused_layercam(["layer2", "layer3", "layer4"])),
    Contender("layercam layer3+4", "fused", fused_layercam(["layer3", "layer4"])),
    Contender("saliency", "", engine_maps(Saliency())),
    Contender("smoothgrad", "16 samples, sigma 0.15", smoothgrad()),
    Contender("activations layer4", "class-agnostic", engine_maps(Activations("layer4"))),
]


def in_batches(
    fn: Callable[..., torch.Tensor],
    model: nn.Module,
    x: torch.Tensor,
    t: torch.Tensor,
    batch: int = 25,
) -> torch.Tensor:
    return torch.cat(
        [fn(model, x[i : i + batch], t[i : i + batch]) for i in range(0, len(x), batch)]
    )


def reference_check(model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> str | None:
    """Lantern's LayerCAM against pytorch-grad-cam's on the unfolded float32 model."""
    try:
        from pytorch_grad_cam import LayerCAM as LibLayerCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError:
        return None
    lines = []
    for layer in ("layer3", "layer4"):
        ours = normalise(
            explain(model, x, [LayerCAM(layer)], targets.tolist()).upsampled("layercam")
        )
        with LibLayerCAM(model=model, target_layers=[model.get_submodule(layer)]) as cam:
            theirs = torch.from_numpy(
                cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in targets])
            )
        rs = [
            float(np.corrcoef(a.flatten().double().numpy(), b.flatten().double().numpy())[0, 1])
            for a, b in zip(ours, theirs, strict=True)
        ]
        diff = float((ours.double() - theirs.double()).abs().max())
        lines.append(
            f"LayerCAM {layer} vs pytorch-grad-cam LayerCAM ({len(rs)} images, upsampled, "
            f"[0, 1]): Pearson r min {min(rs):.5f}, mean {np.mean(rs):.5f}; max |diff| {diff:.2e}"
        )
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    model = cached_model(args)
    x, labels, boxes = shapes(args.test, args.size, TEST_SEED)
    with torch.no_grad():
        accuracy = float((model(x).argmax(1) == labels).float().mean())
    print(f"held-out accuracy {accuracy:.3f} on {args.test} images (seed {TEST_SEED})")
    reference = reference_check(model, x[:16], labels[:16])
    folded = fold_batchnorm(copy.deepcopy(model))

    area = box_masks(boxes, args.size).flatten(1).float().mean(1)
    grown = box_masks(boxes, args.size, args.tolerance).flatten(1).float().mean(1)
    rows: list[tuple[str, str, float, float, float, float]] = []
    random_faith: list[tuple[float, float]] = []
    nf = min(args.faith, args.test)
    for c in CONTENDERS:
        t0 = time.perf_counter()
        maps = in_batches(c.maps, folded, x, labels)
        point = float(pointing(maps, boxes, args.tolerance).float().mean())
        en = float(energy(maps, boxes).mean())
        dels, inss = [], []
        for i in range(nf):
            s = faithfulness.score_maps(
                folded, x[i], {c.name: maps[i]}, int(labels[i]), chunk_size=34
            )[c.name]
            dels.append(s["deletion_auc"])
            inss.append(s["insertion_auc"])
            if len(random_faith) < nf:
                random_faith.append((s["random_deletion_auc"], s["random_insertion_auc"]))
        rows.append((c.name, c.note, point, en, float(np.mean(dels)), float(np.mean(inss))))
        print(
            f"  {c.name:<22} pointing {point:.3f}  energy {en:.3f}  deletion "
            f"{np.mean(dels):.3f}  insertion {np.mean(inss):.3f}  "
            f"({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
    rnd = np.array(random_faith)
    rows.append(
        (
            "random",
            "uniform map",
            float(grown.mean()),
            float(area.mean()),
            float(rnd[:, 0].mean()),
            float(rnd[:, 1].mean()),
        )
    )

    base = rows[0][2]
    cells = args.size // 32
    table = [
        f"{args.arch} trained here on {args.train} generated shapes at {args.size} px "
        f"({args.epochs} epochs; layer4 {cells}x{cells}, layer3 {2 * cells}x{2 * cells}, "
        f"layer2 {4 * cells}x{4 * cells}); held-out accuracy {accuracy:.1%} on {args.test} "
        f"images; maps for the true class; pointing tolerance {args.tolerance} px; "
        f"deletion/insertion on the first {nf} images.",
        "",
        "| method | pointing | vs gradcam layer4 | energy in box | deletion AUC (lower) | "
        "insertion AUC (higher) | note |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, note, point, en, d, ins in rows:
        table.append(
            f"| {name} | {point:.1%} | {100 * (point - base):+.1f} | {en:.3f} | "
            f"{d:.3f} | {ins:.3f} | {note} |"
        )
    text = "\n".join(table)
    if reference:
        text += "\n\n" + reference
    print()
    print(text)
    print(f"\n({time.perf_counter() - started:.0f} s)")
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(get_args_parser().parse_args()))
