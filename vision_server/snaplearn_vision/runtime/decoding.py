"""Encoded photo -> uint8 pixels at a model's input size. Pillow and numpy only, no torch.

The server's decode threads run decode_pixels(); the trainer renders its dataset through
to_model_pixels(), so the model trains on exactly what it is served.
"""

from __future__ import annotations

import io
import re
from functools import lru_cache

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from snaplearn_common.errors import InvalidInput
from snaplearn_vision.schema import DecodeSpec

# Formats phones and browsers produce. Older Pillows open many phone JPEGs as "MPO"; newer
# ones fold it into "JPEG" and no longer know the name, hence the filter in open_formats.
ACCEPTED_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "BMP", "GIF", "TIFF")


@lru_cache(maxsize=1)
def open_formats() -> tuple[str, ...]:
    Image.init()  # registers the plugins; Image.open would do it on first use anyway
    return tuple(name for name in ACCEPTED_FORMATS if name in Image.OPEN)


def _flatten_alpha(image: Image.Image) -> Image.Image:
    """Transparent pixels become white paper, not black (screenshots, scanned PNGs)."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # 16-bit/float greyscale: rescale to 8 bits instead of letting convert() clip to white.
        pixels = np.asarray(image, dtype=np.float32)
        low, high = float(pixels.min()), float(pixels.max())
        scaled = (pixels - low) * (255.0 / (high - low) if high > low else 0.0)
        return Image.fromarray(scaled.astype(np.uint8), "L")
    return image


def to_model_pixels(
    image: Image.Image, channels: int, input_size: tuple[int, int], resize: str = "stretch"
) -> np.ndarray:
    """Any PIL image -> uint8 [H, W, C] at the model's input size (the shared preprocessing).

    The training set goes through this too, so the model trains on what it is served.
    resize "stretch" resizes the whole photo; "center_crop" resizes the largest centred region
    with the input's aspect ratio (one resize, no intermediate image).
    """
    height, width = input_size
    mode = "L" if channels == 1 else "RGB"
    image = _flatten_alpha(image)
    if image.mode != mode:  # convert() to the same mode would copy every pixel
        image = image.convert(mode)
    box = None
    if resize == "center_crop":
        source_w, source_h = image.size
        scale = min(source_w / width, source_h / height)
        crop_w, crop_h = width * scale, height * scale
        left, top = (source_w - crop_w) / 2, (source_h - crop_h) / 2
        box = (left, top, left + crop_w, top + crop_h)
    resized = image.resize((width, height), Image.Resampling.BILINEAR, box=box)
    pixels = np.asarray(resized, dtype=np.uint8)
    return pixels[:, :, None] if channels == 1 else pixels


def decode_pixels(spec: DecodeSpec, image_bytes: bytes) -> np.ndarray:
    """Encoded image (JPEG, PNG, ...) -> uint8 [H, W, C] at the input size. Raises InvalidInput."""
    if not image_bytes:
        raise InvalidInput("image is empty (0 bytes)")
    if len(image_bytes) > spec.max_image_bytes:
        raise InvalidInput(f"image is {len(image_bytes)} bytes; the limit is {spec.max_image_bytes} bytes")
    try:
        # Pillow raises DecompressionBombError itself past twice its own (global) limit;
        # our limit is lower and checked below. No warnings.catch_warnings: not thread-safe.
        image = Image.open(io.BytesIO(image_bytes), formats=open_formats())
    except Image.DecompressionBombError as error:
        # Pillow's message quotes Pillow's limit, not the one this server keeps.
        claimed = re.search(r"\((\d+) pixels\)", str(error))
        size = f"{claimed.group(1)} pixels" if claimed else "far more pixels than allowed"
        raise InvalidInput(f"image is {size}; the limit is {spec.max_image_pixels} pixels") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise InvalidInput(
            f"image bytes are not a decodable image (accepted formats: {', '.join(open_formats())})"
        ) from None
    with image:
        width, height = image.size
        # Checked on the header, before any pixel is decoded.
        if width * height > spec.max_image_pixels:
            raise InvalidInput(
                f"image is {width}x{height} = {width * height} pixels; "
                f"the limit is {spec.max_image_pixels} pixels"
            )
        try:
            # JPEG can decode straight to 1/2, 1/4 or 1/8 scale: far less work for a
            # 12-megapixel photo that will become 64x64. Asked for 1.5x the input size, the
            # resize still averages >= 1.5 source pixels per output pixel (the pixels stay
            # within a few grey levels of a full decode; tests/unit/test_engine.py), and a
            # 320x240 photo for the 64x64 default model decodes at half scale (asking for 4x
            # decoded it whole). Square target: EXIF may rotate it.
            side = (3 * max(spec.height, spec.width)) // 2
            image.draft("L" if spec.channels == 1 else "RGB", (side, side))
            # In place: without it, an upright photo (the usual case) is copied whole.
            ImageOps.exif_transpose(image, in_place=True)
            pixels = to_model_pixels(image, spec.channels, (spec.height, spec.width), spec.resize)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            # In words: the parser's exception class means nothing to the app developer.
            raise InvalidInput(
                f"image data is corrupt or truncated (accepted formats: {', '.join(open_formats())})"
            ) from None
    return pixels
