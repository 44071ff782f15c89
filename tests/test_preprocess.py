"""The service's numpy/PIL preprocessing equals torchvision's evaluation transform."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lantern.core.preprocess import PreprocessSpec
from models.transforms import eval_transform


def _random_image(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


@pytest.mark.parametrize(
    ("size", "crop", "resize"),
    [
        ((224, 224), 224, 224),  # already the right size
        ((32, 32), 224, 224),  # CIFAR upsampled
        ((640, 480), 224, 256),  # landscape, ImageNet-style resize then crop
        ((333, 517), 224, 224),  # portrait, odd sizes
        ((97, 61), 64, 72),  # small and odd
        ((1001, 1000), 64, 64),  # off-by-one rounding in the crop offsets
    ],
)
def test_numpy_preprocessing_matches_torchvision(
    size: tuple[int, int], crop: int, resize: int
) -> None:
    spec = PreprocessSpec(crop_size=crop, resize_size=resize)
    image = _random_image(*size, seed=sum(size))
    ours = spec.apply(image)
    theirs = eval_transform(spec)(image).numpy()
    assert ours.dtype == np.float32 and ours.shape == (3, crop, crop)
    assert theirs.shape == ours.shape
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)


def test_batch_is_the_stack_of_single_images() -> None:
    spec = PreprocessSpec(crop_size=32, resize_size=40)
    images = [_random_image(50, 70, 1), _random_image(90, 40, 2)]
    batch = spec.apply_batch(images)
    assert batch.shape == (2, 3, 32, 32)
    assert np.array_equal(batch[1], spec.apply(images[1]))
    assert torch.from_numpy(batch).is_contiguous()


def test_preprocessing_in_place_is_bit_identical_to_converting_then_normalising() -> None:
    # apply() divides the 8-bit pixels into float32 straight into its output row; that
    # must be the float32 operations of converting first and normalising after.
    spec = PreprocessSpec(crop_size=48, resize_size=56)
    images = [_random_image(70 + i, 90 - i, seed=i) for i in range(4)]
    batch = spec.apply_batch(images)
    for image, row in zip(images, batch, strict=True):
        w, h = image.size
        resized = image.resize(spec.resized_size(w, h), Image.Resampling.BILINEAR)
        left, top = round((resized.width - 48) / 2.0), round((resized.height - 48) / 2.0)
        pixels = np.asarray(resized.crop((left, top, left + 48, top + 48)))
        reference = pixels.transpose(2, 0, 1).astype(np.float32) / np.float32(255.0)
        reference = (reference - np.asarray(spec.mean, np.float32)[:, None, None]) / np.asarray(
            spec.std, np.float32
        )[:, None, None]
        assert reference.dtype == np.float32
        assert np.array_equal(row, reference)
    assert spec.apply_batch([]).shape == (0, 3, 48, 48)


def test_crop_box_is_the_region_the_model_sees() -> None:
    spec = PreprocessSpec(crop_size=224, resize_size=256)
    # 512x256 landscape: resized to 512x256 -> crop 224 at (144, 16) -> x2 back to original
    left, top, right, bottom = spec.crop_box(1024, 512)
    assert (left, top, right, bottom) == pytest.approx((288, 32, 736, 480))
    # square image, no crop margin
    assert PreprocessSpec(crop_size=64, resize_size=64).crop_box(300, 300) == pytest.approx(
        (0, 0, 300, 300)
    )


def test_spec_round_trips_through_its_dict_form() -> None:
    spec = PreprocessSpec(crop_size=96, resize_size=110, mean=(0.5, 0.5, 0.5), std=(0.2, 0.3, 0.4))
    assert PreprocessSpec.from_dict(spec.to_dict()) == spec


def test_non_rgb_input_and_bad_geometry_are_refused() -> None:
    with pytest.raises(ValueError, match="RGB"):
        PreprocessSpec().apply(Image.new("L", (10, 10)))
    with pytest.raises(ValueError, match="resize_size"):
        PreprocessSpec(crop_size=224, resize_size=200)
