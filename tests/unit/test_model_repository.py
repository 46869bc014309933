"""The on-disk model repository and the architecture registry behind it."""

from __future__ import annotations

import json
import urllib.error
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision

from snaplearn_common.errors import NotFound
from snaplearn_vision.runtime.architectures import (
    PretrainedWeightsUnavailable,
    SnapNet,
    UnknownArchitecture,
    build_model,
    check_model_config,
    replace_classifier_head,
)
from snaplearn_vision.runtime.model_repository import ModelLoadError, ModelRepository
from snaplearn_vision.schema import BatchingConfig, InvalidModelConfig, ModelConfig

LABELS = ("cat", "dog", "fish")


def snapnet_config(**overrides: Any) -> ModelConfig:
    """A config the schema accepts and torchvision can build (as the repository checks it)."""
    values: dict[str, Any] = {"architecture": "snapnet", "labels": LABELS, "input_size": (32, 32)}
    config = ModelConfig(**{**values, **overrides})
    check_model_config(config)
    return config


def save_snapnet(repository: ModelRepository, name: str, version: str, **overrides: Any) -> SnapNet:
    torch.manual_seed(int(version))
    model = SnapNet(len(LABELS), in_channels=1)
    repository.save(name, version, snapnet_config(training={"seed": int(version)}, **overrides), model)
    return model


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"architecture": "lenet9000"}, "unknown architecture 'lenet9000'"),
        ({"labels": ()}, "labels must be a non-empty list"),
        ({"labels": ("a", "a")}, "labels must be unique"),
        ({"input_size": (0, 32)}, "input_size must be"),
        ({"channels": 2, "mean": (0.5, 0.5), "std": (0.2, 0.2)}, "channels must be 1"),
        ({"mean": (0.5, 0.5)}, "one value per channel"),
        ({"std": (0.0,)}, "std values must be positive"),
        ({"batching": BatchingConfig(max_batch_size=0)}, "max_batch_size"),
        ({"batching": BatchingConfig(max_queue_delay_ms=-1)}, "max_queue_delay_ms"),
        ({"weights": "../../etc/passwd"}, "weights must be a file name"),
        ({"weights": "torchvision:DEFAULT"}, "'snapnet' has no pretrained weights"),
        ({"architecture": "resnet18", "channels": 1}, "takes 3 input channels"),
    ],
)
def test_invalid_config_is_rejected_with_a_clear_message(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidModelConfig, match=message):
        snapnet_config(**overrides)


def test_config_round_trips_through_json() -> None:
    config = snapnet_config(batching=BatchingConfig(8, 2.5), training={"seed": 3, "test_accuracy": 0.97})

    assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_config_json_with_unknown_or_missing_keys_is_rejected() -> None:
    data = snapnet_config().to_dict()
    with pytest.raises(InvalidModelConfig, match=r"unknown model config keys \['lables'\]"):
        ModelConfig.from_dict({**data, "lables": ["x"]})
    del data["labels"]
    with pytest.raises(InvalidModelConfig, match="labels"):
        ModelConfig.from_dict(data)


def test_save_then_load_gives_the_same_predictions(tmp_path: Path) -> None:
    repository = ModelRepository(tmp_path)
    saved = save_snapnet(repository, "topics", "1").eval()

    classifier = repository.load("topics", "1", device="cpu")

    assert (classifier.name, classifier.version, classifier.labels) == ("topics", "1", LABELS)
    assert classifier.config.training == {"seed": 1}
    batch = np.random.default_rng(0).standard_normal((2, 1, 32, 32)).astype(np.float32)
    with torch.inference_mode():
        expected = torch.softmax(saved(torch.from_numpy(batch)), dim=1).numpy()
    np.testing.assert_allclose(classifier.predict(batch), expected, rtol=1e-5, atol=1e-6)
    on_disk = json.loads((tmp_path / "topics" / "1" / "config.json").read_text())
    assert on_disk["labels"] == list(LABELS)
    assert on_disk["batching"] == {"max_batch_size": 32, "max_queue_delay_ms": 5.0}


def test_latest_version_is_the_highest_integer_not_the_last_string(tmp_path: Path) -> None:
    repository = ModelRepository(tmp_path)
    for version in ("2", "10", "9"):
        save_snapnet(repository, "topics", version)
    (tmp_path / "topics" / "not-a-version").mkdir()

    assert repository.list_versions("topics") == ["2", "9", "10"]
    assert repository.load("topics", device="cpu").version == "10"
    assert repository.load("topics", "", device="cpu").version == "10"
    assert repository.list_models() == ["topics"]


def test_unknown_model_or_version_is_not_found_and_says_what_exists(tmp_path: Path) -> None:
    repository = ModelRepository(tmp_path)
    save_snapnet(repository, "topics", "1")
    save_snapnet(repository, "shapes", "3")

    with pytest.raises(NotFound, match=r"model 'nope' not found.*available models: shapes, topics"):
        repository.load("nope")
    with pytest.raises(NotFound, match="model 'topics' has no version '7'; available versions: 1"):
        repository.load("topics", "7")
    with pytest.raises(NotFound, match="not found"):
        repository.load("../topics")
    assert not repository.has_model("topics", "7")
    assert ModelRepository(tmp_path / "missing").list_models() == []


def test_saving_an_existing_version_needs_overwrite(tmp_path: Path) -> None:
    repository = ModelRepository(tmp_path)
    save_snapnet(repository, "topics", "1")

    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_snapnet(repository, "topics", "1")
    with pytest.raises(ValueError, match="positive integer"):
        repository.save("topics", "v2", snapnet_config(), SnapNet(len(LABELS)))
    with pytest.raises(ValueError, match="model name"):
        repository.save("../escape", "1", snapnet_config(), SnapNet(len(LABELS)))
    assert [p.name for p in (tmp_path / "topics").iterdir()] == ["1"]  # no staging debris


def test_corrupt_or_mismatched_weights_are_a_load_error(tmp_path: Path) -> None:
    repository = ModelRepository(tmp_path)
    save_snapnet(repository, "topics", "1")
    weights = tmp_path / "topics" / "1" / "model.pt"

    torch.save(SnapNet(7).state_dict(), weights)  # 7 classes, config says 3
    with pytest.raises(ModelLoadError, match="cannot load weights"):
        repository.load("topics")
    weights.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match="cannot load weights"):
        repository.load("topics")
    weights.unlink()
    with pytest.raises(ModelLoadError, match="is missing"):
        repository.load("topics")


def test_broken_config_json_names_the_file(tmp_path: Path) -> None:
    repository = ModelRepository(tmp_path)
    save_snapnet(repository, "topics", "1")
    (tmp_path / "topics" / "1" / "config.json").write_text('{"architecture": "snapnet", "labels": []}')

    with pytest.raises(InvalidModelConfig, match=r"topics/1/config.json.*labels must be"):
        repository.load("topics")


@pytest.mark.parametrize("architecture", ["resnet18", "mobilenet_v3_small"])
def test_torchvision_architecture_round_trips_and_predicts(tmp_path: Path, architecture: str) -> None:
    torch.manual_seed(0)
    config = ModelConfig(
        architecture=architecture,
        labels=LABELS,
        input_size=(64, 64),
        channels=3,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
    )
    model = build_model(architecture, len(LABELS), in_channels=3)
    repository = ModelRepository(tmp_path)
    repository.save(architecture, "1", config, model)

    classifier = repository.load(architecture, device="cpu")
    probabilities = classifier.predict(np.zeros((3, 3, 64, 64), dtype=np.float32))

    assert probabilities.shape == (3, len(LABELS))
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def test_unknown_architecture_lists_alternatives() -> None:
    with pytest.raises(UnknownArchitecture, match="resnet18"):
        build_model("resnet9", 3, 3)


def test_pretrained_spec_offline_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The pretrained path is wired to torchvision's downloader; simulate having no network."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # no cached checkpoint

    def offline(url: str, *args: Any, **kwargs: Any) -> None:
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    config = ModelConfig(
        architecture="resnet18",
        labels=LABELS,
        channels=3,
        mean=(0.5,) * 3,
        std=(0.2,) * 3,
        weights="torchvision:IMAGENET1K_V1",
    )
    repository = ModelRepository(tmp_path / "models")
    repository.save("pretrained", "1", config)  # no weights file: the spec is the weights

    with pytest.raises(PretrainedWeightsUnavailable, match=r"resnet18.*download.pytorch.org.*offline"):
        repository.load("pretrained")


def test_unknown_pretrained_weights_name_lists_known_ones() -> None:
    with pytest.raises(InvalidModelConfig, match="no pretrained weights 'IMAGENET9K'; known: IMAGENET1K_V1"):
        check_model_config(
            ModelConfig(
                architecture="resnet18",
                labels=LABELS,
                channels=3,
                mean=(0.5,) * 3,
                std=(0.2,) * 3,
                weights="torchvision:IMAGENET9K",
            )
        )


def test_replace_classifier_head_sets_the_number_of_outputs() -> None:
    model = torchvision.models.mobilenet_v3_small(num_classes=1000)
    replace_classifier_head(model, 4)

    assert model.eval()(torch.zeros(1, 3, 64, 64)).shape == (1, 4)
