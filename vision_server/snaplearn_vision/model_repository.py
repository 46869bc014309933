"""A Triton-like model repository on disk.

    <root>/<model name>/<version>/config.json   what the model is and how to feed it
    <root>/<model name>/<version>/model.pt      its state_dict (torch.save), unless pretrained

Versions are positive integers; the latest is the highest. A version directory is written
under a temporary name and renamed into place, so a reader never sees half of one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from snaplearn_common.errors import NotFound
from snaplearn_vision.architectures import (
    PRETRAINED_PREFIX,
    build_model,
    check_architecture,
    parse_pretrained,
)
from snaplearn_vision.engine import DeviceChoice, ImageClassifier

CONFIG_FILENAME = "config.json"
DEFAULT_WEIGHTS_FILENAME = "model.pt"
# Names become directory names and arrive in client requests: no separators, no "..".
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_VERSION_PATTERN = re.compile(r"^[1-9][0-9]{0,17}$")


class InvalidModelConfig(ValueError):
    """A config.json (or a ModelConfig built in code) that cannot describe a servable model."""


class ModelLoadError(RuntimeError):
    """The config is valid but the weights file is missing, corrupt or does not fit the network."""


@dataclass(frozen=True)
class BatchingConfig:
    """Limits for the server's dynamic batcher (which owns the semantics)."""

    max_batch_size: int = 32
    max_queue_delay_ms: float = 5.0


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    labels: tuple[str, ...]
    input_size: tuple[int, int] = (64, 64)  # (height, width)
    channels: int = 1
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.25,)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    # A file in the version directory, or a pretrained spec such as "torchvision:DEFAULT".
    weights: str = DEFAULT_WEIGHTS_FILENAME
    # Free-form provenance: seed, dataset size, test accuracy, ...
    training: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        problems = self._problems()
        if problems:
            raise InvalidModelConfig("invalid model config: " + "; ".join(problems))

    def _problems(self) -> list[str]:
        problems = []
        try:
            check_architecture(self.architecture, self.channels)
        except ValueError as error:
            problems.append(str(error))
        if not self.labels or not all(isinstance(label, str) and label for label in self.labels):
            problems.append("labels must be a non-empty list of non-empty strings")
        elif len(set(self.labels)) != len(self.labels):
            problems.append("labels must be unique")
        if len(self.input_size) != 2 or not all(
            isinstance(v, int) and 8 <= v <= 4096 for v in self.input_size
        ):
            problems.append(
                f"input_size must be [height, width] integers in 8..4096, got {list(self.input_size)}"
            )
        if self.channels not in (1, 3):
            problems.append(f"channels must be 1 (greyscale) or 3 (RGB), got {self.channels}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            problems.append(f"mean and std need one value per channel ({self.channels})")
        if any(s <= 0 for s in self.std):
            problems.append("std values must be positive")
        if not 1 <= self.batching.max_batch_size <= 4096:
            problems.append(f"batching.max_batch_size must be in 1..4096, got {self.batching.max_batch_size}")
        if not 0 <= self.batching.max_queue_delay_ms <= 10_000:
            problems.append("batching.max_queue_delay_ms must be in 0..10000")
        if self.pretrained is not None:
            try:
                parse_pretrained(self.architecture, self.pretrained)
            except ValueError as error:
                problems.append(str(error))
        elif not _NAME_PATTERN.match(self.weights):
            problems.append(
                f"weights must be a file name in the version directory or "
                f"'{PRETRAINED_PREFIX}<WEIGHTS>', got {self.weights!r}"
            )
        return problems

    @property
    def pretrained(self) -> str | None:
        """The pretrained spec when weights is one, else None."""
        return self.weights if self.weights.startswith(PRETRAINED_PREFIX) else None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Parses config.json content; unknown keys are an error (they are usually typos)."""
        if not isinstance(data, dict):
            raise InvalidModelConfig("model config must be a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidModelConfig(f"unknown model config keys {unknown}; known keys: {sorted(known)}")
        values = dict(data)
        try:
            for key in ("labels", "input_size", "mean", "std"):
                if key in values:
                    values[key] = tuple(values[key])
            if "batching" in values:
                values["batching"] = BatchingConfig(**values["batching"])
            return cls(**values)
        except TypeError as error:  # missing required key, or a wrong shape/type
            raise InvalidModelConfig(f"invalid model config: {error}") from None


class ModelRepository:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"ModelRepository({str(self.root)!r})"

    def list_models(self) -> list[str]:
        """Models with at least one version, sorted by name."""
        if not self.root.is_dir():
            return []
        return sorted(
            p.name for p in self.root.iterdir() if _NAME_PATTERN.match(p.name) and self._versions(p)
        )

    def list_versions(self, name: str) -> list[str]:
        """Versions of a model, oldest first. Raises NotFound for an unknown model."""
        versions = self._versions(self.root / name) if _NAME_PATTERN.match(name) else []
        if not versions:
            raise NotFound(
                f"model {name!r} not found in {self.root}; available models: "
                f"{', '.join(self.list_models()) or 'none'}"
            )
        return versions

    def latest_version(self, name: str) -> str:
        return self.list_versions(name)[-1]

    def has_model(self, name: str, version: str | None = None) -> bool:
        try:
            self.resolve(name, version)
        except NotFound:
            return False
        return True

    def resolve(self, name: str, version: str | None = None) -> tuple[str, Path]:
        """(version, directory) of a model version; None or "" means the latest."""
        versions = self.list_versions(name)
        if not version:
            version = versions[-1]
        if version not in versions:
            raise NotFound(
                f"model {name!r} has no version {version!r}; available versions: {', '.join(versions)}"
            )
        return version, self.root / name / version

    def load_config(self, name: str, version: str | None = None) -> ModelConfig:
        _, directory = self.resolve(name, version)
        return _read_config(directory / CONFIG_FILENAME)

    def load(
        self,
        name: str,
        version: str | None = None,
        device: DeviceChoice | str = "auto",
        **classifier_options: Any,
    ) -> ImageClassifier:
        """The model version ready to serve (latest version when version is None)."""
        version, directory = self.resolve(name, version)
        config = _read_config(directory / CONFIG_FILENAME)
        network = build_model(config.architecture, len(config.labels), config.channels, config.pretrained)
        if config.pretrained is None:
            _load_weights(network, directory / config.weights)
        return ImageClassifier(name, version, config, network, device=device, **classifier_options)

    def save(
        self,
        name: str,
        version: str,
        config: ModelConfig,
        model: nn.Module | None = None,
        overwrite: bool = False,
    ) -> Path:
        """Writes config.json and the state_dict (unless pretrained); returns the version directory."""
        if not _NAME_PATTERN.match(name):
            raise ValueError(f"model name {name!r} must match {_NAME_PATTERN.pattern}")
        if not _VERSION_PATTERN.match(version):
            raise ValueError(f"model version {version!r} must be a positive integer")
        if (model is None) != (config.pretrained is not None):
            raise ValueError("pass the model exactly when config.weights names a weights file")
        target = self.root / name / version
        if target.exists() and not overwrite:
            raise FileExistsError(f"{target} exists; pass overwrite=True to replace it")
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=target.parent))
        staging.chmod(0o755)  # mkdtemp makes it owner-only; a server may run as another user
        try:
            if model is not None:
                state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
                torch.save(state, staging / config.weights)
            (staging / CONFIG_FILENAME).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
            if target.exists():  # overwrite: readers may briefly see the version missing
                shutil.rmtree(target)
            try:
                staging.rename(target)
            except OSError:
                if target.exists():  # another writer won the race between our check and here
                    raise FileExistsError(f"{target} was written concurrently") from None
                raise
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return target

    @staticmethod
    def _versions(model_dir: Path) -> list[str]:
        if not model_dir.is_dir():
            return []
        versions = [
            p.name
            for p in model_dir.iterdir()
            if _VERSION_PATTERN.match(p.name) and (p / CONFIG_FILENAME).is_file()
        ]
        return sorted(versions, key=int)


def _read_config(path: Path) -> ModelConfig:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise InvalidModelConfig(f"cannot read model config {path}: {error}") from None
    try:
        return ModelConfig.from_dict(data)
    except InvalidModelConfig as error:
        raise InvalidModelConfig(f"{path}: {error}") from None


def _load_weights(network: nn.Module, path: Path) -> None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # weights_only: no pickled code
        network.load_state_dict(state)
    except FileNotFoundError:
        raise ModelLoadError(f"weights file {path} is missing") from None
    except Exception as error:
        raise ModelLoadError(f"cannot load weights {path} into the network: {error}") from error
