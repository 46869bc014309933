"""A Triton-like model repository on disk.

    <root>/<model name>/<version>/config.json   what the model is, its format, how to feed it
    <root>/<model name>/<version>/model.pt      a state_dict (torch.save) or TorchScript archive,
                                   model.pt2    a torch.export program, model.onnx an ONNX graph
                                                (config.json's "format" and "weights" say which)

Versions are positive integers; the latest is the highest. A version directory is written
under a temporary name (its files made durable by snaplearn_common.files) and renamed into
place, so neither a reader nor a crash ever sees half of one.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from snaplearn_common.errors import NotFound
from snaplearn_common.files import atomic_write, fsync_directory
from snaplearn_vision.runtime.architectures import check_model_config
from snaplearn_vision.runtime.engine import ImageClassifier, resolve_device
from snaplearn_vision.runtime.formats import ModelLoadError, load_network
from snaplearn_vision.schema import (
    CONFIG_FILENAME,
    NAME_PATTERN,
    VERSION_PATTERN,
    DeviceChoice,
    InvalidModelConfig,
    ModelConfig,
)

__all__ = ["ModelLoadError", "ModelRepository", "load_version_directory"]


class ModelRepository:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"ModelRepository({str(self.root)!r})"

    def list_models(self) -> list[str]:
        """Models with at least one version, sorted by name."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if NAME_PATTERN.match(p.name) and self._versions(p))

    def list_versions(self, name: str) -> list[str]:
        """Versions of a model, oldest first. Raises NotFound for an unknown model."""
        versions = self._versions(self.root / name) if NAME_PATTERN.match(name) else []
        if not versions:
            raise NotFound(
                f"model {name!r} not found; available models: {', '.join(self.list_models()) or 'none'}"
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
        version, directory = self.resolve(name, version)
        return _read_config(directory / CONFIG_FILENAME, f"{name}/{version}")

    def load(
        self,
        name: str,
        version: str | None = None,
        device: DeviceChoice | str = "auto",
        **classifier_options: Any,
    ) -> ImageClassifier:
        """The model version loaded and checked (latest version when version is None).

        Raises NotFound, InvalidModelConfig or ModelLoadError (both FailedPrecondition). Not yet
        warmed: call warm_up() on it before it takes traffic, close() once it is retired.
        """
        version, directory = self.resolve(name, version)
        return load_version_directory(directory, name, version, device=device, **classifier_options)

    def save(
        self,
        name: str,
        version: str,
        config: ModelConfig,
        model: nn.Module | None = None,
        overwrite: bool = False,
    ) -> Path:
        """Writes config.json and the state_dict (unless pretrained); returns the version directory."""
        if not NAME_PATTERN.match(name):
            raise ValueError(f"model name {name!r} must match {NAME_PATTERN.pattern}")
        if not VERSION_PATTERN.match(version):
            raise ValueError(f"model version {version!r} must be a positive integer")
        check_model_config(config)
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
                weights = io.BytesIO()
                torch.save(state, weights)
                atomic_write(staging / config.weights, weights.getvalue())
            atomic_write(staging / CONFIG_FILENAME, json.dumps(config.to_dict(), indent=2) + "\n")
            if target.exists():  # overwrite: readers may briefly see the version missing
                shutil.rmtree(target)
            try:
                staging.rename(target)
            except OSError:
                if target.exists():  # another writer won the race between our check and here
                    raise FileExistsError(f"{target} was written concurrently") from None
                raise
            fsync_directory(target.parent)
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
            if VERSION_PATTERN.match(p.name) and (p / CONFIG_FILENAME).is_file()
        ]
        return sorted(versions, key=int)


def load_version_directory(
    directory: str | os.PathLike[str],
    name: str,
    version: str,
    device: DeviceChoice | str = "auto",
    **classifier_options: Any,
) -> ImageClassifier:
    """One version directory (in a repository, or staged by `models add`) loaded and checked:
    its config.json read, its file loaded in its format, its declared shapes compared with the
    config, and probe batches of 1 and 2 run (ImageClassifier.check)."""
    directory = Path(directory)
    where = f"{name}/{version}"
    config = _read_config(directory / CONFIG_FILENAME, where)
    network = load_network(config, directory, where, resolve_device(str(device)))
    classifier = ImageClassifier(name, version, config, network, device=device, **classifier_options)
    try:
        classifier.check()
    except BaseException:
        classifier.close()
        raise
    return classifier


def _read_config(path: Path, where: str) -> ModelConfig:
    """config.json parsed and checked; messages name it as "<name>/<version>/config.json"."""
    label = f"{where}/{CONFIG_FILENAME}"
    try:
        data = json.loads(path.read_text())
    except OSError as error:
        raise InvalidModelConfig(f"cannot read {label}: {error.strerror or type(error).__name__}") from None
    except json.JSONDecodeError as error:
        raise InvalidModelConfig(f"{label} is not valid JSON: {error}") from None
    try:
        config = ModelConfig.from_dict(data)
        check_model_config(config)
    except InvalidModelConfig as error:
        raise InvalidModelConfig(f"{label}: {error}") from None
    return config
