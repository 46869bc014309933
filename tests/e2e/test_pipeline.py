"""The whole pipeline as users run it: separate processes, real gRPC, the embedded bus.

photo -> vision server (CNN) -> ImageClassified on the bus -> recommender worker (LightFM)
-> Recommend. Two students photograph different topics; each one's recommendations must
move toward the topics of their own photos.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from snaplearn_client import RecommenderClient, VisionClient
from snaplearn_vision.worksheets import sample_image_bytes
from tests.helpers.system import embedded_system
from tests.helpers.vision_model import trained_model_repository  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parents[2]
# Topics the small test model recognises reliably (see tests/helpers/vision_model.py).
STUDENTS = {"e2e-fractions-fan": "fractions", "e2e-geometry-fan": "geometry"}
PHOTOS_PER_STUDENT = 6


def _share(items, topic: str) -> float:
    return sum(topic in item.concepts for item in items) / max(len(items), 1)


@pytest.fixture
def system(tmp_path: Path, trained_model_repository: Path) -> Iterator[tuple[str, str]]:  # noqa: F811
    with embedded_system(tmp_path / "var", trained_model_repository) as running:
        yield running.vision_target, running.recommender_target


def test_each_student_moves_toward_their_own_photos(system: tuple[str, str]) -> None:
    vision_target, recommender_target = system
    with VisionClient(vision_target, timeout_s=30) as vision, RecommenderClient(recommender_target) as rec:
        before = {user: rec.recommend(user, k=10) for user in STUDENTS}
        assert all(reply.cold_start for reply in before.values())
        applied_before = max(reply.events_applied for reply in before.values())

        recognised = 0
        for i in range(PHOTOS_PER_STUDENT):
            for user, topic in STUDENTS.items():
                reply = vision.classify(sample_image_bytes(topic, seed=500 + i), user, top_k=3)
                assert len(reply.labels) == 3
                assert reply.model_name == "worksheet-topics"
                recognised += reply.labels[0].label == topic
        assert recognised >= 0.8 * PHOTOS_PER_STUDENT * len(STUDENTS)

        sent = PHOTOS_PER_STUDENT * len(STUDENTS)
        deadline = time.monotonic() + 60
        while rec.recommend("e2e-fractions-fan", k=1).events_applied < applied_before + sent:
            assert time.monotonic() < deadline, "recommender did not apply the events within 60 s"
            time.sleep(0.05)

        after = {user: rec.recommend(user, k=10) for user in STUDENTS}
        for user, topic in STUDENTS.items():
            other = next(t for t in STUDENTS.values() if t != topic)
            assert not after[user].cold_start
            assert _share(after[user].items, topic) > _share(before[user].items, topic)
            assert _share(after[user].items, topic) >= 0.5
            assert _share(after[user].items, topic) > _share(after[user].items, other)
            assert any(topic in item.reason for item in after[user].items)


def test_bad_input_gets_a_clear_status_and_the_system_keeps_serving(system: tuple[str, str]) -> None:
    vision_target, recommender_target = system
    with VisionClient(vision_target) as vision, RecommenderClient(recommender_target) as rec:
        with pytest.raises(grpc.RpcError) as raised:
            vision.classify(b"not an image", "e2e-user")
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as raised:
            rec.recommend("e2e-user", k=1000)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        reply = vision.classify(sample_image_bytes("fractions", seed=1), "e2e-user")
        assert reply.labels


def test_cli_classifies_and_recommends(system: tuple[str, str], tmp_path: Path) -> None:
    vision_target, recommender_target = system
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(sample_image_bytes("geometry", seed=3))
    cli = [sys.executable, "-m", "snaplearn_client.cli", "--vision", vision_target]
    cli += ["--recommender", recommender_target]
    classified = subprocess.run(
        [*cli, "classify", str(photo), "--user", "cli-user"], capture_output=True, text=True
    )
    assert classified.returncode == 0, classified.stderr
    assert "1. geometry" in classified.stdout
    # Several files go over one ClassifyStream: an answer or an error per file, exit 1 if any failed.
    second, broken = tmp_path / "second.jpg", tmp_path / "broken.jpg"
    second.write_bytes(sample_image_bytes("fractions", seed=4))
    broken.write_bytes(b"not an image")
    many = subprocess.run(
        [*cli, "classify", str(photo), str(broken), str(second), "--user", "cli-user"],
        capture_output=True,
        text=True,
    )
    assert many.returncode == 1, many.stderr
    blocks = many.stdout.split(f"{second}:")
    assert f"{photo}:" in blocks[0] and "1. geometry" in blocks[0]
    assert f"{broken}: error: INVALID_ARGUMENT: image bytes are not a decodable image" in blocks[0]
    assert "model " in blocks[1] and "  1. " in blocks[1]  # its own answer, after the broken file's error
    recommended = subprocess.run(
        [*cli, "recommend", "--user", "cli-user", "--k", "3"], capture_output=True, text=True
    )
    assert recommended.returncode == 0, recommended.stderr
    assert recommended.stdout.count("\n") >= 4  # header + 3 items with reasons
