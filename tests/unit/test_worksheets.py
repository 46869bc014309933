"""The synthetic worksheet renderer: deterministic, covers every topic, looks like a photo."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from snaplearn_common.topics import DEFAULT_TOPICS
from snaplearn_vision.worksheets import (
    make_dataset,
    render_ink,
    render_topic,
    sample_image_bytes,
    sample_photo,
)


@pytest.mark.parametrize("topic", DEFAULT_TOPICS)
def test_every_topic_renders_an_rgb_photo_with_ink_on_paper(topic: str) -> None:
    image = render_topic(topic, np.random.default_rng(3), size=(160, 120))

    assert image.mode == "RGB"
    assert image.size == (160, 120)
    grey = np.asarray(image.convert("L"), dtype=np.float32)
    # Paper dominates, ink is darker than it: the problem is visible, not a blank page.
    assert np.median(grey) - np.percentile(grey, 1) > 40


def test_same_seed_renders_identical_pixels() -> None:
    first = render_topic("fractions", np.random.default_rng([7, 1]))
    second = render_topic("fractions", np.random.default_rng([7, 1]))

    assert first.size == second.size
    assert np.array_equal(np.asarray(first), np.asarray(second))


def test_different_seeds_render_different_problems() -> None:
    first = np.asarray(render_ink("addition", np.random.default_rng(1)))
    second = np.asarray(render_ink("addition", np.random.default_rng(2)))

    assert first.shape != second.shape or not np.array_equal(first, second)


def test_different_topics_draw_different_ink_from_the_same_seed() -> None:
    inks = {topic: np.asarray(render_ink(topic, np.random.default_rng(5))) for topic in DEFAULT_TOPICS}

    distinct = {(ink.shape, ink.tobytes()) for ink in inks.values()}
    assert len(distinct) == len(DEFAULT_TOPICS)


def test_unknown_topic_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"unknown topic 'calculus'.*addition"):
        render_ink("calculus", np.random.default_rng(0))
    with pytest.raises(ValueError, match="unknown topic"):
        sample_image_bytes("calculus")


def test_sample_image_bytes_are_a_decodable_jpeg_and_deterministic() -> None:
    data = sample_image_bytes("geometry", seed=4)

    assert data[:3] == b"\xff\xd8\xff"  # JPEG SOI marker
    assert data == sample_image_bytes("geometry", seed=4)
    assert data != sample_image_bytes("geometry", seed=5)
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "JPEG"
        assert image.size == (320, 240)


def test_make_dataset_is_balanced_deterministic_and_model_sized() -> None:
    images, labels = make_dataset(n_per_class=3, seed=11, size=(32, 48))

    assert images.shape == (3 * len(DEFAULT_TOPICS), 32, 48, 1)
    assert images.dtype == np.uint8
    assert labels.tolist() == [label for label in range(len(DEFAULT_TOPICS)) for _ in range(3)]
    again, _ = make_dataset(n_per_class=3, seed=11, size=(32, 48))
    assert np.array_equal(images, again)
    other_seed, _ = make_dataset(n_per_class=3, seed=12, size=(32, 48))
    assert not np.array_equal(images, other_seed)


def test_a_sample_does_not_change_when_the_dataset_grows() -> None:
    small, _ = make_dataset(n_per_class=2, seed=0, size=(32, 32))
    large, _ = make_dataset(n_per_class=4, seed=0, size=(32, 32))

    assert np.array_equal(small[:2], large[:2])  # first class, first two samples


def test_rgb_dataset_has_three_channels() -> None:
    images, _ = make_dataset(n_per_class=1, seed=0, size=(32, 32), channels=3)

    assert images.shape == (len(DEFAULT_TOPICS), 32, 32, 3)


def test_the_command_writes_per_topic_png_photos_the_same_for_the_same_seed(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "snaplearn_vision.worksheets", "--per-topic", "2", "--seed", "5"]
    done = subprocess.run(
        [*command, "--out", str(tmp_path / "a")], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert f"{2 * len(DEFAULT_TOPICS)} photos (2 per topic)" in done.stdout
    written = sorted(path.relative_to(tmp_path / "a") for path in (tmp_path / "a").rglob("*"))
    folders = [Path(topic) for topic in DEFAULT_TOPICS]
    files = [Path(topic) / f"{i}.png" for topic in DEFAULT_TOPICS for i in range(2)]
    assert written == sorted(folders + files)
    for topic in DEFAULT_TOPICS:
        with Image.open(tmp_path / "a" / topic / "1.png") as image:
            assert image.format == "PNG"
            assert image.size == (320, 240)
            # Photo i of a topic is sample_photo with seed + i, pixel for pixel (PNG is lossless).
            assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(sample_photo(topic, 6)))
    again = subprocess.run(
        [*command, "--out", str(tmp_path / "b")], capture_output=True, text=True, timeout=120
    )
    assert again.returncode == 0, again.stderr
    for file in files:
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes()


def test_the_command_refuses_a_negative_count(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "snaplearn_vision.worksheets", "--out", str(tmp_path), "--per-topic", "-1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "--per-topic must be >= 0, got -1" in done.stderr
    assert not any(tmp_path.iterdir())
