"""The training command: what it writes, and that it trains only when it must."""

from __future__ import annotations

from pathlib import Path

import pytest

from snaplearn_common.topics import DEFAULT_TOPICS
from snaplearn_vision import train
from snaplearn_vision.runtime.model_repository import ModelRepository
from snaplearn_vision.train import (
    DEFAULT_MODEL_NAME,
    DEFAULT_MODEL_VERSION,
    TrainingSettings,
    ensure_default_model,
    train_and_save,
)
from tests.helpers.vision_model import TEST_TRAINING, trained_model_repository  # noqa: F401

TINY = TrainingSettings(n_per_class=4, epochs=1, progress=False, min_test_accuracy=0.0)


def test_trained_model_config_records_labels_batching_and_provenance(
    trained_model_repository: Path,  # noqa: F811
) -> None:
    config = ModelRepository(trained_model_repository).load_config(DEFAULT_MODEL_NAME, DEFAULT_MODEL_VERSION)

    assert config.architecture == "snapnet"
    assert config.labels == DEFAULT_TOPICS
    assert (config.channels, config.input_size) == (1, (64, 64))
    assert config.batching.max_batch_size >= 1
    assert config.training["seed"] == TEST_TRAINING.seed
    assert config.training["dataset_size"] == TEST_TRAINING.n_per_class * len(DEFAULT_TOPICS)
    assert config.training["test_accuracy"] >= TEST_TRAINING.min_test_accuracy


def test_ensure_default_model_does_not_retrain_an_existing_model(
    trained_model_repository: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def must_not_train(*args: object, **kwargs: object) -> None:
        raise AssertionError("trained again")

    monkeypatch.setattr(train, "train_and_save", must_not_train)

    path = ensure_default_model(trained_model_repository)

    assert path == trained_model_repository / DEFAULT_MODEL_NAME / DEFAULT_MODEL_VERSION


def test_a_model_below_the_accuracy_bar_is_not_saved(tmp_path: Path) -> None:
    impossible = TrainingSettings(n_per_class=4, epochs=1, progress=False, min_test_accuracy=1.01)

    with pytest.raises(RuntimeError, match=r"below 1\.01; model not saved"):
        train_and_save(tmp_path, settings=impossible)
    assert ModelRepository(tmp_path).list_models() == []


def test_same_seed_trains_the_same_model(tmp_path: Path) -> None:
    first = train_and_save(tmp_path, version="1", settings=TINY)
    second = train_and_save(tmp_path, version="2", settings=TINY)

    assert (first.path / "model.pt").read_bytes() == (second.path / "model.pt").read_bytes()
    assert first.test_accuracy == second.test_accuracy


def test_cli_writes_the_model_and_prints_its_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tiny = ["--n-per-class", "4", "--epochs", "1", "--threads", "1", "--no-progress"]
    code = train.main(["--repository", str(tmp_path), *tiny, "--min-test-accuracy", "0"])

    assert code == 0
    out = capsys.readouterr().out
    assert "test accuracy:" in out
    assert out.strip().endswith(str(tmp_path / DEFAULT_MODEL_NAME / DEFAULT_MODEL_VERSION))
    assert train.main(["--repository", str(tmp_path), *tiny, "--min-test-accuracy", "0"]) == 1  # exists
