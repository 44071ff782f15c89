"""The torchvision twins of the preprocessing spec, for training and evaluation.

`eval_transform(spec)` performs exactly the steps of `PreprocessSpec.apply` (the core's
numpy/PIL version, which the service and the workers use); `tests/test_preprocess.py`
proves they agree. `train_transform(spec)` adds light augmentation on the same geometry.
"""

from __future__ import annotations

from typing import Any

from lantern.core.preprocess import PreprocessSpec


def eval_transform(spec: PreprocessSpec) -> Any:
    """Resize the shorter side, centre-crop, scale to [0, 1], normalise: CHW float32."""
    from torchvision import transforms as T

    return T.Compose(
        [
            T.Resize(spec.resize_size, interpolation=T.InterpolationMode.BILINEAR),
            T.CenterCrop(spec.crop_size),
            T.ToTensor(),
            T.Normalize(spec.mean, spec.std),
        ]
    )


def train_transform(spec: PreprocessSpec) -> Any:
    """Evaluation geometry plus light augmentation (padded random crop, horizontal flip)."""
    from torchvision import transforms as T

    return T.Compose(
        [
            T.Resize(spec.resize_size),
            T.RandomCrop(spec.crop_size, padding=spec.crop_size // 16, padding_mode="reflect"),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(spec.mean, spec.std),
        ]
    )
