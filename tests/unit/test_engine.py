"""ImageClassifier: decoding untrusted bytes, batched prediction, top-k."""

from __future__ import annotations

import io
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from snaplearn_common.errors import InvalidInput
from snaplearn_common.topics import DEFAULT_TOPICS
from snaplearn_vision.runtime.architectures import SnapNet
from snaplearn_vision.runtime.decoding import to_model_pixels
from snaplearn_vision.runtime.engine import ImageClassifier, resolve_device
from snaplearn_vision.runtime.model_repository import ModelRepository
from snaplearn_vision.schema import (
    DEFAULT_MAX_IMAGE_BYTES,
    DEFAULT_MODEL_NAME,
    DEFAULT_MODEL_VERSION,
    ModelConfig,
)
from snaplearn_vision.worksheets import sample_image_bytes
from tests.helpers.vision_model import trained_model_repository  # noqa: F401 (session fixture)

LABELS = ("a", "b", "c", "d")


def make_classifier(model: torch.nn.Module | None = None, **options: int) -> ImageClassifier:
    torch.manual_seed(0)
    config = ModelConfig(architecture="snapnet", labels=LABELS, input_size=(32, 32), mean=(0.5,), std=(0.25,))
    network = model if model is not None else SnapNet(len(LABELS))
    return ImageClassifier("test", "1", config, network, device="cpu", **options)


def encode(image: Image.Image, image_format: str = "PNG", **save_options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **save_options)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height but carries almost no data: a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def classifier() -> ImageClassifier:
    return make_classifier()


def test_decode_gives_normalised_chw_float32_at_the_input_size(classifier: ImageClassifier) -> None:
    pixels = classifier.decode(encode(Image.new("RGB", (300, 200), (255, 255, 255)), "JPEG"))

    assert pixels.shape == (1, 32, 32)
    assert pixels.dtype == np.float32
    np.testing.assert_allclose(pixels, (1.0 - 0.5) / 0.25, atol=0.05)  # white paper after normalising


def test_transparent_pixels_become_white_paper(classifier: ImageClassifier) -> None:
    pixels = classifier.decode(encode(Image.new("RGBA", (40, 40), (0, 0, 0, 0))))

    np.testing.assert_allclose(pixels, 2.0, atol=1e-6)


def test_exif_orientation_is_applied_before_resizing(classifier: ImageClassifier) -> None:
    image = Image.new("L", (64, 32), 255)
    image.paste(0, (0, 0, 32, 32))  # left half black as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": the left half ends up on top

    pixels = classifier.decode(encode(image, "JPEG", exif=exif.tobytes()))[0]

    assert pixels[:12].mean() < -1.5
    assert pixels[-12:].mean() > 1.5


def test_a_jpeg_decoded_at_reduced_scale_matches_the_full_resolution_pixels(
    trained_model_repository: Path,  # noqa: F811
) -> None:
    """decode_pixels asks libjpeg for a 1/2-1/8 scale decode that still has >= 1.5 pixels per
    output pixel: the served pixels must stay what the full decode + resize gives (the model
    was trained on those), only cheaper."""
    model = ModelRepository(trained_model_repository).load(
        DEFAULT_MODEL_NAME, DEFAULT_MODEL_VERSION, device="cpu"
    )
    for topic, size in [("fractions", (320, 240)), ("geometry", (1280, 960)), ("exponents", (200, 150))]:
        photo = sample_image_bytes(topic, seed=3, size=size)
        with Image.open(io.BytesIO(photo)) as full:
            full.load()
            expected = to_model_pixels(full, model.config.channels, model.config.input_size)
        served = model.decode_pixels(photo)
        assert served.shape == expected.shape
        difference = np.abs(served.astype(np.int16) - expected.astype(np.int16))
        # Measured: mean 0.08-0.4 grey levels, at most 6 of 255.
        assert difference.mean() < 1.0 and difference.max() <= 16, (size, difference.mean(), difference.max())


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "image is empty"),
        (b"definitely not an image" * 10, "not a decodable image"),
        (b"\xff\xd8\xff\xe0" + b"\x00" * 100, "not a decodable image|corrupt or truncated"),
        (png_header_only(8000, 8000), "8000x8000 = 64000000 pixels; the limit is 50000000"),
        (png_header_only(100_000, 100_000), "10000000000 pixels; the limit is 50000000 pixels"),
    ],
    ids=["empty", "garbage", "broken-jpeg", "pixel-bomb", "pillow-bomb"],
)
def test_bad_bytes_are_invalid_input_with_a_clear_message(
    classifier: ImageClassifier, data: bytes, message: str
) -> None:
    with pytest.raises(InvalidInput, match=message):
        classifier.decode(data)


def test_truncated_image_is_invalid_input(classifier: ImageClassifier) -> None:
    photo = sample_image_bytes("fractions", seed=0)

    with pytest.raises(InvalidInput, match=r"corrupt or truncated|not a decodable image"):
        classifier.decode(photo[: len(photo) // 2])


def test_unaccepted_formats_are_refused(classifier: ImageClassifier) -> None:
    with pytest.raises(InvalidInput, match="accepted formats: JPEG"):
        classifier.decode(encode(Image.new("L", (8, 8)), "PPM"))


def test_byte_limit_defaults_to_10_mib_and_is_configurable() -> None:
    assert DEFAULT_MAX_IMAGE_BYTES == 10 * 1024 * 1024
    with pytest.raises(InvalidInput, match=f"the limit is {DEFAULT_MAX_IMAGE_BYTES} bytes"):
        make_classifier().decode(b"\0" * (DEFAULT_MAX_IMAGE_BYTES + 1))
    small = make_classifier(max_image_bytes=1000)
    with pytest.raises(InvalidInput, match="image is 1001 bytes; the limit is 1000 bytes"):
        small.decode(b"\0" * 1001)


def test_pixel_limit_is_configurable() -> None:
    strict = make_classifier(max_image_pixels=100 * 100)

    with pytest.raises(InvalidInput, match="101x100"):
        strict.decode(encode(Image.new("L", (101, 100))))
    assert strict.decode(encode(Image.new("L", (100, 100)))).shape == (1, 32, 32)


def test_decode_is_safe_from_many_threads(classifier: ImageClassifier) -> None:
    photos = [sample_image_bytes(topic, seed=1) for topic in DEFAULT_TOPICS]
    sequential = [classifier.decode(photo) for photo in photos]

    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(classifier.decode, photos * 3))

    for index, pixels in enumerate(concurrent):
        np.testing.assert_array_equal(pixels, sequential[index % len(photos)])


@pytest.mark.parametrize("rows", [0, 1, 5])
def test_predict_returns_one_probability_row_per_input(classifier: ImageClassifier, rows: int) -> None:
    batch = np.random.default_rng(rows).standard_normal((rows, 1, 32, 32)).astype(np.float32)

    probabilities = classifier.predict(batch)

    assert probabilities.shape == (rows, len(LABELS))
    assert probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert (probabilities >= 0).all()


def test_predict_rejects_a_batch_of_the_wrong_shape(classifier: ImageClassifier) -> None:
    with pytest.raises(ValueError, match=r"batch must be \[N, 1, 32, 32\]"):
        classifier.predict(np.zeros((2, 3, 32, 32), dtype=np.float32))


def test_predict_checks_the_model_answered_every_row() -> None:
    class DropsRows(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.zeros(1, len(LABELS))

    with pytest.raises(RuntimeError, match=r"returned .* for 3 inputs"):
        make_classifier(DropsRows()).predict(np.zeros((3, 1, 32, 32), dtype=np.float32))


def test_top_k_orders_by_score_and_clips_to_the_labels(classifier: ImageClassifier) -> None:
    row = np.array([0.1, 0.6, 0.05, 0.25], dtype=np.float32)

    assert classifier.top_k(row, 2) == [("b", pytest.approx(0.6)), ("d", pytest.approx(0.25))]
    assert [label for label, _ in classifier.top_k(row, 10)] == ["b", "d", "a", "c"]
    with pytest.raises(InvalidInput, match="k must be at least 1"):
        classifier.top_k(row, 0)


def test_device_choice() -> None:
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="'auto', 'cpu' or 'cuda'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="cuda"):
            resolve_device("cuda")


def test_trained_model_recognises_rendered_photos(trained_model_repository: Path) -> None:  # noqa: F811
    model = ModelRepository(trained_model_repository).load(
        DEFAULT_MODEL_NAME, DEFAULT_MODEL_VERSION, device="cpu"
    )

    assert model.labels == DEFAULT_TOPICS
    for seed in range(3):
        (label, score), *_ = model.classify(sample_image_bytes("fractions", seed=seed), k=3)
        assert label == "fractions"
        assert score > 0.5
    assert model.classify(sample_image_bytes("geometry", seed=0), k=1)[0][0] == "geometry"
