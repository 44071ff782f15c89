"""Uploaded bytes -> a validated RGB PIL image (torch-free).

Everything a client can get wrong about an image is caught here and raised as an
`InputError` subclass carrying its HTTP status; the service turns those into JSON.

    not an image / a format Lantern does not read   UnsupportedMediaType  415
    over the pixel limit (decompression bomb)       PayloadTooLarge       413
    empty, truncated or corrupt data                UnprocessableInput    422
    zero width or height                            UnprocessableInput    422
"""

from __future__ import annotations

import io
import struct

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from lantern.core.errors import PayloadTooLarge, UnprocessableInput, UnsupportedMediaType

# Decoders Pillow may use; anything else is refused before a decoder runs. (The JPEG
# decoder also reads MPO, the multi-picture JPEG many phone cameras write.)
FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
Image.init()  # registers every plugin; Image.open(formats=...) needs WEBP and TIFF loaded
READABLE = "JPEG, PNG, WebP, BMP, GIF or TIFF"
# Composited under transparent pixels: a white page is what a person sees in a viewer.
BACKGROUND = (255, 255, 255)


def decode_image(
    data: bytes, *, max_pixels: int, name: str = "the upload", reduce_for: int | None = None
) -> Image.Image:
    """Decode `data` into a fully loaded RGB image, EXIF orientation applied.

    `name` (a file name or field) makes error messages point at the offending upload.
    `reduce_for`: the shorter side the caller will resize the image to. A JPEG at least
    four times that on its shorter side is then decoded at 1/2, 1/4 or 1/8 scale (libjpeg
    scales while decoding; Pillow's `draft`), keeping the shorter side at least twice
    `reduce_for`, as Pillow's `thumbnail(reducing_gap=2)` does: a 4032x3024 photo decodes
    in a third of the CPU, and after the resize the pixels differ by under half a level of
    255 on average (BENCHMARKS.md, "What the per-request work is"). Other formats decode whole.
    """
    if not data:
        raise UnprocessableInput(f"{name} is empty; send the bytes of a {READABLE} image")
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError:
        raise _too_many_pixels(name, None, max_pixels) from None
    except (UnidentifiedImageError, ValueError, SyntaxError, OSError):
        # Pillow refuses headers that declare a zero dimension; say so rather than "not an image".
        declared = _declared_size(data)
        if declared is not None and 0 in declared:
            raise UnprocessableInput(
                f"{name} has zero width or height ({declared[0]}x{declared[1]})"
            ) from None
        # Pillow cannot even read the header: not an image, or a format it is not allowed to use.
        raise UnsupportedMediaType(
            f"{name} is not an image Lantern can read; send a {READABLE} file"
        ) from None
    width, height = image.size
    if width <= 0 or height <= 0:
        raise UnprocessableInput(f"{name} has zero width or height ({width}x{height})")
    if width * height > max_pixels:
        raise _too_many_pixels(name, (width, height), max_pixels)
    if reduce_for is not None and image.format in ("JPEG", "MPO"):
        image.draft("RGB", (2 * reduce_for, 2 * reduce_for))
    try:
        image.load()  # GIF/TIFF/WebP open on their first frame
        upright: Image.Image = ImageOps.exif_transpose(image) or image
    except Image.DecompressionBombError:
        raise _too_many_pixels(name, (width, height), max_pixels) from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:
        raise UnprocessableInput(
            f"{name} could not be decoded: the {image.format} data is truncated or corrupt ({e})"
        ) from None
    return to_rgb(upright)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB, the way a person would see the picture.

    Transparency is composited over white (not dropped to black), palettes are expanded,
    CMYK is converted, and 16/32-bit greyscale is scaled to 8 bits instead of clipped.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in image.info
        image = image.convert("RGBA" if has_alpha else "RGB")
        mode = image.mode
    if mode in ("RGBA", "LA", "RGBa", "La"):
        if mode in ("RGBa", "La"):  # premultiplied alpha
            image = image.convert("RGBA" if mode == "RGBa" else "LA")
        rgba = image.convert("RGBA")
        page = Image.new("RGB", rgba.size, BACKGROUND)
        page.paste(rgba, mask=rgba.getchannel("A"))
        return page
    if mode.startswith("I") or mode == "F":
        return _high_depth_grey_to_rgb(image)
    try:
        return image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV
    except ValueError:
        raise UnprocessableInput(f"images in colour mode {mode} are not supported") from None


def _high_depth_grey_to_rgb(image: Image.Image) -> Image.Image:
    """16-bit ("I;16*", or "I" holding 16-bit values) and float greyscale -> 8-bit RGB."""
    values = np.asarray(image).astype(np.float64)
    if image.mode == "F":
        # Float images are [0, 1] by convention; some writers use [0, 255].
        scale = 255.0 if values.size and values.max() <= 1.0 else 1.0
    elif image.mode.startswith("I;16") or (values.size and values.max() > 255):
        scale = 255.0 / 65535.0
    else:
        scale = 1.0
    grey = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


def _too_many_pixels(name: str, size: tuple[int, int] | None, max_pixels: int) -> PayloadTooLarge:
    dims = f"{size[0]}x{size[1]} = {size[0] * size[1]:,} pixels" if size else "too many pixels"
    return PayloadTooLarge(
        f"{name} is too large ({dims}); the limit is {max_pixels:,} pixels. "
        "Downscale the image before sending it."
    )


def _declared_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) as a PNG, GIF or BMP header states it, read without Pillow."""
    if data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) >= 24 and data[12:16] == b"IHDR":
        width, height = struct.unpack(">II", data[16:24])
        return int(width), int(height)
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        width, height = struct.unpack("<HH", data[6:10])
        return int(width), int(height)
    if data.startswith(b"BM") and len(data) >= 26:
        width, height = struct.unpack("<ii", data[18:26])
        return abs(int(width)), abs(int(height))
    return None
