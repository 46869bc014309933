"""Defects found when the vision server was tried from outside (issue 21), each as it was met:
a real server on port 0 over the small trained model."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from snaplearn_common.ids import MAX_ID_CHARS
from tests.helpers.vision_model import trained_model_repository  # noqa: F401 (session fixture)
from tests.helpers.vision_server import (
    MODEL_NAME,
    MODEL_VERSION,
    ServerFactory,
    correctly_classified_images,
    expect_status,
    read_events,
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


async def test_below_the_models_min_confidence_a_photo_is_not_recognised_and_not_published(
    server_factory: ServerFactory,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Was: a chart or a selfie got a confident label, was published and steered the student's
    recommendations. A model's config.json min_confidence now marks such answers."""
    root = tmp_path / "repository"
    shutil.copytree(server_factory.model_root, root)
    strict = root / "strict" / "1"
    shutil.copytree(root / MODEL_NAME / MODEL_VERSION, strict)
    config = json.loads((strict / "config.json").read_text())
    config["min_confidence"] = 0.9999
    (strict / "config.json").write_text(json.dumps(config))
    noise = io.BytesIO()
    Image.fromarray(np.random.default_rng(7).integers(0, 256, (240, 320, 3), dtype=np.uint8)).save(
        noise, "PNG"
    )
    factory = ServerFactory(root, tmp_path)
    try:
        running = await factory.start()
        refused = await running.stub.Classify(
            request(noise.getvalue(), user="strict-user", model_name="strict")
        )
        assert refused.not_recognised and refused.labels, refused  # still its best guesses
        assert refused.labels[0].score < 0.9999
        accepted = await running.stub.Classify(request(noise.getvalue(), user="normal-user"))
        assert not accepted.not_recognised
        # Published in order: once the second photo's event is there, the first's would be too.
        events = read_events(running.bus, 2, timeout_s=5.0)
        assert [record.key.decode() for record in events] == ["normal-user"]
    finally:
        await factory.close()
