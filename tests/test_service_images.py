"""Upload decoding: every accepted format and mode becomes the right RGB picture, and every
broken upload is refused with the right InputError."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from lantern.core.errors import (
    InputError,
    PayloadTooLarge,
    UnprocessableInput,
    UnsupportedMediaType,
)
from lantern.core.images import decode_image
from tests.service_fixtures import (
    RED,
    animated_gif,
    encode,
    exif_rotated_jpeg,
    grey16,
    jpeg,
    png_header_only,
    solid,
    truncated,
)

LIMIT = 40_000_000
WHITE = (255, 255, 255)


def decoded_colour(data: bytes) -> tuple[int, int, int]:
    image = decode_image(data, max_pixels=LIMIT)
    assert image.mode == "RGB"
    r, g, b = np.asarray(image).reshape(-1, 3).mean(axis=0)
    return round(r), round(g), round(b)


def assert_close(got: tuple[int, int, int], want: tuple[int, int, int], tol: int) -> None:
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) <= tol, (got, want)


GREY = (128, 128, 128)
CMYK_RED = (0, 255, 255, 0)


@pytest.mark.parametrize(
    ("fmt", "mode", "colour", "want", "tol"),
    [
        ("JPEG", "RGB", RED, RED, 4),
        ("JPEG", "L", 128, GREY, 2),
        ("JPEG", "CMYK", CMYK_RED, (255, 0, 0), 4),
        ("PNG", "RGB", RED, RED, 0),
        ("PNG", "L", 128, GREY, 0),
        ("PNG", "P", RED, RED, 0),
        ("WEBP", "RGB", RED, RED, 6),
        ("BMP", "RGB", RED, RED, 0),
        ("BMP", "L", 128, GREY, 0),
        ("GIF", "RGB", RED, RED, 0),
        ("TIFF", "RGB", RED, RED, 0),
        ("TIFF", "L", 128, GREY, 0),
        ("TIFF", "CMYK", CMYK_RED, (255, 0, 0), 0),
    ],
)
def test_opaque_images_in_each_format_and_mode_decode_to_their_rgb_colour(
    fmt: str, mode: str, colour: object, want: tuple[int, int, int], tol: int
) -> None:
    image = solid(mode if mode != "P" else "RGB", (24, 16), colour)
    if mode == "P":
        image = image.convert("P")
    data = encode(image, fmt, **({"lossless": False, "quality": 95} if fmt == "WEBP" else {}))
    assert Image.open(io.BytesIO(data)).mode == mode or fmt == "GIF"
    assert_close(decoded_colour(data), want, tol)


@pytest.mark.parametrize(
    ("fmt", "mode"),
    [("PNG", "RGBA"), ("PNG", "LA"), ("WEBP", "RGBA"), ("TIFF", "RGBA"), ("TIFF", "LA")],
)
def test_transparent_pixels_are_composited_over_white(fmt: str, mode: str) -> None:
    image = solid("RGBA", (10, 10), (*RED, 255))
    image.paste((0, 0, 0, 0), (0, 0, 5, 10))  # left half fully transparent black
    if mode == "LA":
        image = image.convert("LA")
    decoded = np.asarray(decode_image(encode(image, fmt, **_lossless(fmt)), max_pixels=LIMIT))
    assert tuple(decoded[5, 1]) == WHITE  # transparent: the white page, not black
    opaque = tuple(int(v) for v in decoded[5, 8])
    assert opaque == (RED if mode == "RGBA" else (opaque[0],) * 3)
    assert opaque != WHITE


def test_palette_png_with_a_transparent_index_is_composited_over_white() -> None:
    image = solid("P", (8, 8), 1)
    image.putpalette([0, 0, 0, *RED] + [0] * 762)
    image.paste(0, (0, 0, 4, 8))
    data = encode(image, "PNG", transparency=0)
    decoded = np.asarray(decode_image(data, max_pixels=LIMIT))
    assert tuple(decoded[0, 0]) == WHITE and tuple(decoded[0, 7]) == RED


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_greyscale_is_scaled_to_8_bits_not_clipped(fmt: str) -> None:
    for value16, value8 in [(65535, 255), (32896, 128), (0, 0), (257 * 10, 10)]:
        data = encode(grey16(value16), fmt)
        assert Image.open(io.BytesIO(data)).mode.startswith("I")
        assert decoded_colour(data) == (value8,) * 3


def test_gif_answers_with_its_first_frame() -> None:
    assert decoded_colour(animated_gif(RED, (0, 0, 255))) == RED


def test_exif_orientation_is_applied() -> None:
    image = decode_image(exif_rotated_jpeg(), max_pixels=LIMIT)
    assert image.size == (20, 40)
    pixels = np.asarray(image).astype(int)
    assert_close(tuple(pixels[5, 10]), RED, 12)  # type: ignore[arg-type]
    assert_close(tuple(pixels[35, 10]), (0, 0, 255), 12)  # type: ignore[arg-type]


def test_large_photo_keeps_its_size() -> None:
    assert decode_image(jpeg((640, 480)), max_pixels=LIMIT).size == (640, 480)


def _textured(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """A photo-like picture: smooth colour fields with fine grain on top."""
    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 256, (9, 12, 3), dtype=np.uint8)).resize(
        size, Image.Resampling.BICUBIC
    )
    grain = rng.integers(-24, 25, (size[1], size[0], 3))
    return Image.fromarray(np.clip(np.asarray(base) + grain, 0, 255).astype(np.uint8))


def test_a_large_jpeg_is_decoded_at_reduced_scale_and_the_model_sees_the_same_picture() -> None:
    """reduce_for=224: a 2000x1500 JPEG decodes at 1/2 scale (its shorter side 750 stays
    >= 2 x 224; 1/4 would give 375), and after the preprocessing the model input differs
    from a full decode by less than a level of 255 on average."""
    from lantern.core.preprocess import PreprocessSpec

    data = encode(_textured((2000, 1500)), "JPEG", quality=90)
    reduced = decode_image(data, max_pixels=LIMIT, reduce_for=224)
    whole = decode_image(data, max_pixels=LIMIT)
    assert whole.size == (2000, 1500)
    assert reduced.size == (1000, 750)
    spec = PreprocessSpec()
    std = np.asarray(spec.std, dtype=np.float32)[:, None, None]
    levels = np.abs(spec.apply(reduced) - spec.apply(whole)) * std * 255  # in 0..255 levels
    assert levels.mean() < 1.0
    assert levels.max() <= 8.0


def test_reduce_for_leaves_small_jpegs_and_other_formats_whole() -> None:
    # 640x480: a 1/2-scale decode would leave the shorter side at 240 < 2 x 224.
    assert decode_image(jpeg((640, 480)), max_pixels=LIMIT, reduce_for=224).size == (640, 480)
    # Only libjpeg can scale while decoding; a large PNG decodes whole.
    png = encode(_textured((2000, 1500)), "PNG")
    assert decode_image(png, max_pixels=LIMIT, reduce_for=224).size == (2000, 1500)


def test_reduced_decoding_applies_exif_orientation_after_scaling() -> None:
    image = _textured((1600, 1000))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    data = encode(image, "JPEG", quality=90, exif=exif.tobytes())
    assert decode_image(data, max_pixels=LIMIT, reduce_for=112).size == (250, 400)


@pytest.mark.parametrize(
    ("data", "error", "status", "words"),
    [
        (b"", UnprocessableInput, 422, "empty"),
        (b"this is plain text, not a picture", UnsupportedMediaType, 415, "not an image"),
        (b"%PDF-1.4\n" + b"\x00" * 64, UnsupportedMediaType, 415, "not an image"),
        (truncated(jpeg((200, 150))), UnprocessableInput, 422, "truncated"),
        (
            truncated(encode(solid("RGB", (200, 150), RED), "PNG")),
            UnprocessableInput,
            422,
            "truncated",
        ),
        (png_header_only(100_000, 100_000), PayloadTooLarge, 413, "pixels"),
        (png_header_only(50_000, 1_000), PayloadTooLarge, 413, "pixels"),
    ],
    ids=["empty", "text", "pdf", "truncated-jpeg", "truncated-png", "bomb-10G", "bomb-50M"],
)
def test_broken_uploads_are_refused_with_a_status_and_a_reason(
    data: bytes, error: type[InputError], status: int, words: str
) -> None:
    with pytest.raises(error) as caught:
        decode_image(data, max_pixels=LIMIT, name="field 'image'")
    assert caught.value.status_code == status
    assert words in str(caught.value) and "field 'image'" in str(caught.value)


def test_zero_sized_images_are_refused() -> None:
    bmp = bytearray(encode(solid("RGB", (4, 4), RED), "BMP"))
    bmp[18:22] = (0).to_bytes(4, "little")
    for data in (png_header_only(0, 10), png_header_only(10, 0), bytes(bmp)):
        with pytest.raises(UnprocessableInput, match="zero width or height") as caught:
            decode_image(data, max_pixels=LIMIT)
        assert caught.value.status_code == 422


def test_the_pixel_limit_is_a_setting_not_a_constant() -> None:
    data = jpeg((100, 100))
    assert decode_image(data, max_pixels=10_000).size == (100, 100)
    with pytest.raises(PayloadTooLarge, match=r"limit is 9,999 pixels"):
        decode_image(data, max_pixels=9_999)


def _lossless(fmt: str) -> dict[str, object]:
    return {"lossless": True} if fmt == "WEBP" else {}
