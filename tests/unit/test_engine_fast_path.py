"""The serving path of ImageClassifier: uint8 decode, batch assembly in a reused buffer, settings.

decode_pixels + predict_pixels must give the very probabilities of decode + predict (the
normalisation moved into the batch, not changed), and the GPU-only settings must be ignored
on CPU, visibly, without changing results.
"""

from __future__ import annotations

import logging
import threading

import numpy as np
import pytest
import torch

from snaplearn_vision.runtime.architectures import SnapNet, build_model
from snaplearn_vision.runtime.engine import ImageClassifier, InferenceSettings
from snaplearn_vision.schema import BatchingConfig, ModelConfig
from snaplearn_vision.worksheets import sample_image_bytes

LABELS = ("a", "b", "c", "d")
TOPICS = ("fractions", "geometry", "addition", "exponents", "square_roots")


def greyscale(**settings: object) -> ImageClassifier:
    torch.manual_seed(0)
    config = ModelConfig(
        architecture="snapnet",
        labels=LABELS,
        input_size=(32, 32),
        mean=(0.5,),
        std=(0.25,),
        batching=BatchingConfig(max_batch_size=4),
    )
    return ImageClassifier(
        "grey", "1", config, SnapNet(len(LABELS)), device="cpu", inference=InferenceSettings(**settings)
    )


def rgb(**settings: object) -> ImageClassifier:
    torch.manual_seed(0)
    config = ModelConfig(
        architecture="mobilenet_v3_small",
        labels=LABELS,
        input_size=(48, 40),
        channels=3,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        batching=BatchingConfig(max_batch_size=4),
    )
    model = build_model("mobilenet_v3_small", len(LABELS), 3, None)
    return ImageClassifier("rgb", "1", config, model, device="cpu", inference=InferenceSettings(**settings))


def photos(count: int) -> list[bytes]:
    return [sample_image_bytes(TOPICS[i % len(TOPICS)], seed=i) for i in range(count)]


@pytest.mark.parametrize("make", [greyscale, rgb], ids=["greyscale", "rgb"])
@pytest.mark.parametrize("channels_last", [True, False])
def test_uint8_path_gives_the_probabilities_of_the_float_path(make: object, channels_last: bool) -> None:
    classifier = make(channels_last=channels_last)  # type: ignore[operator]
    images = photos(3)
    pixels = [classifier.decode_pixels(image) for image in images]
    channels, height, width = classifier.input_shape
    assert all(p.dtype == np.uint8 and p.shape == (height, width, channels) for p in pixels)
    fast = classifier.predict_pixels(pixels)
    reference = classifier.predict(np.stack([classifier.decode(image) for image in images]))
    assert fast.shape == (3, len(LABELS))
    np.testing.assert_allclose(fast, reference, rtol=1e-4, atol=1e-5)


def test_the_batch_buffer_is_reused_across_batches_of_any_size() -> None:
    classifier = greyscale()
    pixels = [classifier.decode_pixels(image) for image in photos(7)]
    one_by_one = np.concatenate([classifier.predict_pixels([p]) for p in pixels])
    # Larger than max_batch_size (4): the buffer grows; smaller again: it is reused, no stale rows.
    np.testing.assert_allclose(classifier.predict_pixels(pixels), one_by_one, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(classifier.predict_pixels(pixels[:2]), one_by_one[:2], rtol=1e-5, atol=1e-6)
    assert classifier.predict_pixels([]).shape == (0, len(LABELS))


def test_each_model_thread_has_its_own_buffer() -> None:
    classifier = greyscale()
    pixels = [classifier.decode_pixels(image) for image in photos(4)]
    expected = classifier.predict_pixels(pixels)
    results: list[np.ndarray] = []
    threads = [
        threading.Thread(target=lambda: results.append(classifier.predict_pixels(pixels))) for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 3
    for result in results:
        np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-6)


def test_wrongly_shaped_images_are_refused_with_the_expected_shape() -> None:
    classifier = greyscale()
    with pytest.raises(ValueError, match=r"uint8 \[32, 32, 1\]"):
        classifier.predict_pixels([np.zeros((16, 16, 1), dtype=np.uint8)])


def test_gpu_only_settings_are_ignored_on_cpu_and_say_so(caplog: pytest.LogCaptureFixture) -> None:
    reference = greyscale()
    with caplog.at_level(logging.INFO, logger="snaplearn_vision.runtime.engine"):
        tuned = greyscale(precision="fp16", compile=True, pin_memory=True, channels_last=True)
    assert tuned.inference == InferenceSettings(
        precision="fp32", channels_last=True, compile=False, pin_memory=False, flush_denormals=True
    )
    assert "ignoring GPU-only settings" in caplog.text and "precision=fp16" in caplog.text
    assert next(tuned.model.parameters()).dtype == torch.float32
    pixels = [tuned.decode_pixels(image) for image in photos(2)]
    np.testing.assert_allclose(tuned.predict_pixels(pixels), reference.predict_pixels(pixels), rtol=1e-5)


def test_unknown_precision_is_refused() -> None:
    with pytest.raises(ValueError, match="precision must be one of fp32, fp16, bf16"):
        InferenceSettings(precision="int8")
