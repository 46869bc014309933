"""What a refused photo's message says (issue 21, "messages that mislead"): our limits, every
accepted format, in the message and in the proto's comment."""

from __future__ import annotations

import io
import re
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from snaplearn_common.errors import InvalidInput
from snaplearn_vision.runtime.decoding import decode_pixels, open_formats
from snaplearn_vision.schema import DecodeSpec

ROOT = Path(__file__).resolve().parents[2]
SPEC = DecodeSpec(channels=3, height=16, width=16, max_image_pixels=1_000_000)


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (no pixel data: the limit is checked on the header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


def test_a_pixel_bomb_is_refused_with_our_limit_not_pillows() -> None:
    # Pillow refuses this one itself, before our check: its message quoted its own limit.
    pillow_limit = Image.MAX_IMAGE_PIXELS or 0
    with pytest.raises(InvalidInput) as refused:
        decode_pixels(SPEC, _png_header(40_000, 40_000))
    message = str(refused.value)
    assert message == f"image is 1600000000 pixels; the limit is {SPEC.max_image_pixels} pixels"
    assert str(pillow_limit) not in message


def test_an_image_over_our_limit_names_its_size_and_our_limit() -> None:
    with pytest.raises(
        InvalidInput, match=r"image is 2000x1000 = 2000000 pixels; the limit is 1000000 pixels"
    ):
        decode_pixels(SPEC, _png_header(2000, 1000))


@pytest.mark.parametrize("fmt", ["GIF", "TIFF", "WEBP", "BMP", "PNG", "JPEG"])
def test_every_format_the_message_lists_decodes(fmt: str) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 24), (200, 30, 30)).save(buffer, format=fmt)
    assert decode_pixels(SPEC, buffer.getvalue()).shape == (16, 16, 3)
    assert fmt in open_formats()


def test_the_refusal_and_the_proto_comment_list_gif_and_tiff() -> None:
    with pytest.raises(InvalidInput) as refused:
        decode_pixels(SPEC, b"not an image")
    assert "GIF" in str(refused.value) and "TIFF" in str(refused.value)
    proto = (ROOT / "protos/snaplearn/vision/v1/vision.proto").read_text()
    comment = re.search(r"// Encoded image \(([^)]*)\)", proto)
    assert comment is not None
    assert [f.strip() for f in re.split(r",| or ", comment.group(1)) if f.strip()] == [
        "JPEG",
        "PNG",
        "WebP",
        "BMP",
        "GIF",
        "TIFF",
    ]


def test_a_truncated_photo_is_refused_in_words_without_a_class_name() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 200, 30)).save(buffer, format="PNG")
    with pytest.raises(InvalidInput) as refused:
        decode_pixels(SPEC, buffer.getvalue()[:60])
    message = str(refused.value)
    assert message.startswith("image data is corrupt or truncated"), message
    assert "Error" not in message, message
