"""A small trained worksheet-topic model, shared by every test that needs a real one.

Use it by importing the fixture into a test module (pytest finds fixtures by name there):

    from tests.helpers.vision_model import trained_model_repository  # noqa: F401

    def test_something(trained_model_repository: Path) -> None:
        model = ModelRepository(trained_model_repository).load("worksheet-topics", device="cpu")

The repository holds DEFAULT_MODEL_NAME / DEFAULT_MODEL_VERSION, trained on fewer photos and
epochs than the real model: good on the distinctive topics (fractions, geometry, exponents,
square roots), imperfect on the operator-only ones (addition vs subtraction). Tests that need a
correct answer should pick photos the model gets right, as tests/integration/test_vision_server.py does.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from snaplearn_vision.train import (
    DEFAULT_MODEL_NAME,
    DEFAULT_MODEL_VERSION,
    TrainingSettings,
    ensure_default_model,
)

# ~20 s on one core; enough for the tests' purposes, not for the 95% the real model must reach.
TEST_TRAINING = TrainingSettings(seed=0, n_per_class=240, epochs=10, progress=False, min_test_accuracy=0.8)

_lock = threading.Lock()


def train_test_model(repository_root: Path) -> Path:
    """Trains the small default model into repository_root unless it is there; returns the root."""
    with _lock:
        ensure_default_model(repository_root, TEST_TRAINING)
    return repository_root


@pytest.fixture(scope="session")
def trained_model_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root of a model repository holding a small trained worksheet-topics model, version 1.

    Trained once per session: every module that imports this fixture gets its own copy of the
    fixture definition, so the model is found by its fixed path under the session's base temp
    directory rather than trained again.
    """
    return train_test_model(tmp_path_factory.getbasetemp() / "vision-model-repository")


__all__ = ["DEFAULT_MODEL_NAME", "DEFAULT_MODEL_VERSION", "train_test_model", "trained_model_repository"]
