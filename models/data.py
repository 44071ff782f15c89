"""Datasets: CIFAR-10 (torchvision), any ImageFolder, and two generated tasks.

The generated `shapes` dataset draws one filled shape — circle, square, triangle or cross —
in a random colour, size and position on a noisy background; the class is the shape. The
object occupies a known box, so explanation tests can check that a heatmap points at it.

`glyphs` is a second task drawn the same way with four other classes — star, ring, diamond
and arrow — so that a backbone trained on `shapes` can be transferred to a task it has not
seen (models/demo.py); its random stream is its own, so no glyph repeats a shape's layout.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from PIL import Image, ImageDraw

from lantern.core.errors import DataError

SHAPES = ("circle", "square", "triangle", "cross")
GLYPHS = ("star", "ring", "diamond", "arrow")
GENERATED: dict[str, tuple[str, ...]] = {"shapes": SHAPES, "glyphs": GLYPHS}
CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)


@dataclass(frozen=True)
class ShapeSample:
    image: Image.Image
    label: int
    box: tuple[int, int, int, int]  # the shape's bounding box: left, top, right, bottom


def draw_shape(
    index: int, size: int = 64, seed: int = 0, label: int | None = None, task: str = "shapes"
) -> ShapeSample:
    """Sample `index` of a generated task (`shapes` or `glyphs`): deterministic in
    (task, index, size, seed)."""
    classes = GENERATED[task]
    rng = random.Random(
        f"{seed}:{index}:{size}" if task == "shapes" else f"{task}:{seed}:{index}:{size}"
    )
    label = index % len(classes) if label is None else label
    bg = tuple(rng.randint(0, 90) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    # background clutter: faint specks, so the model must find the shape, not the colour
    for _ in range(size // 4):
        x, y = rng.randrange(size), rng.randrange(size)
        c = tuple(min(255, v + rng.randint(0, 40)) for v in bg)
        draw.point((x, y), fill=c)
    side = rng.randint(size // 4, size // 2)
    left, top = rng.randint(0, size - side), rng.randint(0, size - side)
    box = (left, top, left + side, top + side)
    colour = tuple(rng.randint(130, 255) for _ in range(3))
    _draw(draw, classes[label], box, colour)
    return ShapeSample(img, label, box)


def _draw(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill: Any) -> None:
    left, top, right, bottom = box
    w = right - left
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        inset = w // 8
        draw.rectangle((left + inset, top + inset, right - inset, bottom - inset), fill=fill)
    elif shape == "triangle":
        draw.polygon([(left + w / 2, top), (right, bottom), (left, bottom)], fill=fill)
    elif shape == "cross":
        t = max(2, math.ceil(w / 4))
        mid = left + w // 2
        draw.rectangle((mid - t // 2, top, mid + t // 2, bottom), fill=fill)
        midy = top + w // 2
        draw.rectangle((left, midy - t // 2, right, midy + t // 2), fill=fill)
    elif shape == "star":  # five points, inner radius 0.4 of the outer
        cx, cy, r = left + w / 2, top + w / 2, w / 2
        points = [
            (
                cx + (r if k % 2 == 0 else 0.4 * r) * math.sin(math.pi * k / 5),
                cy - (r if k % 2 == 0 else 0.4 * r) * math.cos(math.pi * k / 5),
            )
            for k in range(10)
        ]
        draw.polygon(points, fill=fill)
    elif shape == "ring":
        draw.ellipse(box, outline=fill, width=max(2, w // 7))
    elif shape == "diamond":
        cx, cy = left + w / 2, top + w / 2
        draw.polygon([(cx, top), (right, cy), (cx, bottom), (left, cy)], fill=fill)
    elif shape == "arrow":  # pointing right: a shaft and a head
        t = max(2, w // 4)
        midy = top + w // 2
        draw.rectangle((left, midy - t // 2, left + w * 0.55, midy + t // 2), fill=fill)
        draw.polygon(
            [(left + w * 0.5, top + w * 0.15), (right, midy), (left + w * 0.5, bottom - w * 0.15)],
            fill=fill,
        )
    else:  # pragma: no cover - the class lists are closed
        raise ValueError(shape)


class ShapesDataset:
    """A map-style dataset of `length` generated images (PIL, label)."""

    classes: ClassVar[list[str]] = list(SHAPES)
    task: ClassVar[str] = "shapes"

    def __init__(self, length: int, size: int = 64, seed: int = 0, transform: Any = None):
        self.length, self.size, self.seed, self.transform = length, size, seed, transform

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Any, int]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        sample = draw_shape(index, self.size, self.seed, task=self.task)
        image = self.transform(sample.image) if self.transform else sample.image
        return image, sample.label


class GlyphsDataset(ShapesDataset):
    """The second generated task: stars, rings, diamonds and arrows."""

    classes: ClassVar[list[str]] = list(GLYPHS)
    task: ClassVar[str] = "glyphs"


def generated_dataset(task: str, length: int, size: int, seed: int, transform: Any = None) -> Any:
    """`shapes` or `glyphs`: the generated dataset of that name."""
    cls = {"shapes": ShapesDataset, "glyphs": GlyphsDataset}[task]
    return cls(length, size=size, seed=seed, transform=transform)


def write_shapes_folder(root: Path, per_class: int, size: int = 64, seed: int = 0) -> Path:
    """Write the generated dataset as an ImageFolder tree: root/<shape>/<n>.png."""
    for label, shape in enumerate(SHAPES):
        (root / shape).mkdir(parents=True, exist_ok=True)
        for n in range(per_class):
            sample = draw_shape(n * len(SHAPES) + label, size, seed)
            sample.image.save(root / shape / f"{n:05d}.png")
    return root


def image_folder(root: Path, transform: Any = None) -> Any:
    """torchvision's ImageFolder, with errors a person can act on."""
    from torchvision.datasets import ImageFolder

    if not root.exists():
        raise DataError(f"dataset directory {root} does not exist")
    if not root.is_dir():
        raise DataError(f"dataset path {root} is not a directory")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise DataError(
            f"{root} has {len(classes)} class folder(s) ({', '.join(classes) or 'none'}); "
            "an ImageFolder needs one sub-folder per class and at least two classes"
        )
    try:
        return ImageFolder(str(root), transform=transform)
    except (FileNotFoundError, RuntimeError) as e:
        raise DataError(f"{root}: {e}") from None


def cifar10(root: Path, train: bool, download: bool, transform: Any = None) -> Any:
    """CIFAR-10 through torchvision; downloads into `root` when `download` is set."""
    from torchvision.datasets import CIFAR10

    try:
        return CIFAR10(str(root), train=train, download=download, transform=transform)
    except RuntimeError as e:  # "Dataset not found or corrupted."
        raise DataError(
            f"CIFAR-10 is not in {root} ({e}); pass --download to fetch it, "
            "or --data-dir pointing at an existing copy"
        ) from None
    except OSError as e:  # URLError: no network
        raise DataError(
            f"could not download CIFAR-10 into {root}: {e}. Download it elsewhere and pass "
            "--data-dir, or use --dataset shapes for the generated data"
        ) from None
