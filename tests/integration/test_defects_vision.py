"""Defects found when the vision server was tried from outside (issue 21), each as it was met:
a real server on port 0 over the small trained model."""

from __future__ import annotations

import shutil
from pathlib import Path

import grpc
import pytest

from snaplearn_common.ids import MAX_ID_CHARS
from tests.helpers.vision_model import trained_model_repository  # noqa: F401 (session fixture)
from tests.helpers.vision_server import (
    MODEL_NAME,
    MODEL_VERSION,
    ServerFactory,
    correctly_classified_images,
    expect_status,
    request,
    server_factory,  # noqa: F401 (fixture)
)

pytestmark = pytest.mark.timeout(120)


async def test_classify_keeps_the_one_user_id_limit_and_message(
    server_factory: ServerFactory,  # noqa: F811
) -> None:
    # The recommender's Recommend and RecordFeedback answer the very same words
    # (tests/integration/test_feedback_pipeline.py).
    running = await server_factory.start()
    photo = correctly_classified_images(server_factory.model_root)["fractions"]
    details = await expect_status(
        running.stub.Classify(request(photo, user="u" * (MAX_ID_CHARS + 1))), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert details == f"user_id is {MAX_ID_CHARS + 1} characters; the limit is {MAX_ID_CHARS}"
    reply = await running.stub.Classify(request(photo, user="u" * MAX_ID_CHARS))
    assert reply.labels[0].label == "fractions"


async def test_a_broken_model_folder_is_failed_precondition_and_not_offered_as_available(
    server_factory: ServerFactory,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Was: INTERNAL for the broken model, and NOT_FOUND listed it as available with the
    server's repository path."""
    root = tmp_path / "repository"
    shutil.copytree(server_factory.model_root, root)
    (root / "broken-config" / "1").mkdir(parents=True)
    (root / "broken-config" / "1" / "config.json").write_text("{not json")
    weights = root / "broken-weights" / "1"
    shutil.copytree(root / MODEL_NAME / MODEL_VERSION, weights)
    for file in weights.iterdir():
        if file.name != "config.json":
            file.write_bytes(b"these are not weights")
    factory = ServerFactory(root, tmp_path)
    try:
        running = await factory.start()
        photo = correctly_classified_images(root)["geometry"]
        for name in ("broken-config", "broken-weights"):
            details = await expect_status(
                running.stub.Classify(request(photo, model_name=name)), grpc.StatusCode.FAILED_PRECONDITION
            )
            assert name in details and str(tmp_path) not in details, details
        details = await expect_status(
            running.stub.Classify(request(photo, model_name="no-such-model")), grpc.StatusCode.NOT_FOUND
        )
        assert "no-such-model" in details and MODEL_NAME in details, details
        assert "broken" not in details and str(tmp_path) not in details, details
        # The good model still serves.
        assert (await running.stub.Classify(request(photo))).labels[0].label == "geometry"
    finally:
        await factory.close()


EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "photos"


async def test_the_shipped_sample_photos_classify(
    server_factory: ServerFactory,  # noqa: F811
) -> None:
    # A newcomer had no photo to try: examples/photos holds one per topic of the default model.
    photos = sorted(EXAMPLES.glob("*/*.png"))
    assert len({path.parent.name for path in photos}) == 10, photos
    assert sum(path.stat().st_size for path in photos) < 1_000_000  # small: they are committed
    running = await server_factory.start()
    right = 0
    for path in photos:
        reply = await running.stub.Classify(request(path.read_bytes(), top_k=3))
        assert reply.model_name == MODEL_NAME and len(reply.labels) == 3
        right += reply.labels[0].label == path.parent.name
    assert right >= len(photos) // 2, f"only {right} of {len(photos)} sample photos recognised"
