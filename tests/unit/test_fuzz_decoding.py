"""Fuzzing the decode path: any bytes -> pixels of the model's shape, or InvalidInput. Nothing else.

Bytes come from three sources: random, the hostile corpus's images as they are, and those images
mutated (bytes overwritten, slices cut, tails cut), which reach far deeper into each decoder than
random bytes do. CI runs a few derandomized examples; scripts/fuzz.py runs many.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given

from snaplearn_common.errors import InvalidInput
from snaplearn_vision.runtime.decoding import decode_pixels
from snaplearn_vision.schema import DecodeSpec
from tests.hostile.fuzz import fuzz_settings, image_bytes

SPECS = [
    DecodeSpec(channels=1, height=64, width=64),
    DecodeSpec(channels=3, height=32, width=48, resize="center_crop"),
    # Small limits, so the limit checks are reached by ordinary images too.
    DecodeSpec(channels=3, height=16, width=16, max_image_bytes=4096, max_image_pixels=2000),
]


def decode_or_refuse(spec: DecodeSpec, data: bytes) -> None:
    try:
        pixels = decode_pixels(spec, data)
    except InvalidInput as error:
        message = str(error)
        assert message and "Traceback" not in message
        assert "PIL" not in message and "/" not in message.replace(" / ", ""), message
        return
    assert isinstance(pixels, np.ndarray)
    assert pixels.dtype == np.uint8
    assert pixels.shape == (spec.height, spec.width, spec.channels)


# Pillow warns about the corrupt EXIF/TIFF tags the mutations make; expected, and not a failure.
@pytest.mark.filterwarnings("ignore::UserWarning:PIL")
@pytest.mark.parametrize("spec", SPECS, ids=["grey64", "rgb-crop", "tiny-limits"])
@fuzz_settings(ci_examples=150)
@given(data=image_bytes())
def test_any_bytes_decode_to_pixels_or_invalid_input(spec: DecodeSpec, data: bytes) -> None:
    decode_or_refuse(spec, data)
