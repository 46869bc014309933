"""Which network a model config names: the project's own SnapNet, or any torchvision classifier.

A torchvision architecture can start from random weights (the repository then holds a trained
state_dict) or from torchvision's pretrained weights ("torchvision:DEFAULT",
"torchvision:IMAGENET1K_V1"), in which case its classifier head is replaced for our labels.
Pretrained weights are downloaded by torchvision (or read from its cache in $TORCH_HOME).

torchvision is imported only when a torchvision network is named: importing it costs seconds
(it pulls in torch._dynamo), which a TorchScript, exported or ONNX version never needs, and
`models add` pays every import on the way to a new version going live.
"""

from __future__ import annotations

import importlib
from functools import lru_cache
from types import ModuleType
from typing import TYPE_CHECKING

import torch
from torch import nn

from snaplearn_vision.schema import DEFAULT_ARCHITECTURE, PRETRAINED_PREFIX, InvalidModelConfig, ModelConfig

if TYPE_CHECKING:
    import torchvision


def _torchvision() -> ModuleType:
    return importlib.import_module("torchvision")


class UnknownArchitecture(ValueError):
    """The config names an architecture that is neither SnapNet nor a torchvision classifier."""


class PretrainedWeightsUnavailable(RuntimeError):
    """Pretrained weights were asked for but could not be fetched (offline, no cache)."""


class SnapNet(nn.Module):
    """A compact CNN for small greyscale photos of printed problems.

    Four conv blocks (conv-BN-ReLU, 2x2 max-pool between them) from 16 to 96 channels, then
    global *max* pooling: what tells topics apart is whether a small glyph (times sign, divide sign, decimal
    point, a radical) is anywhere in the photo; averaging would dilute it with blank paper.
    """

    def __init__(self, num_classes: int, in_channels: int = 1, widths: tuple[int, ...] = (16, 24, 48, 96)):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for index, width in enumerate(widths):
            if index:
                layers.append(nn.MaxPool2d(2))
            layers += [
                nn.Conv2d(channels, width, kernel_size=3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            channels = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.dropout = nn.Dropout(0.1)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(torch.flatten(self.pool(self.features(x)), 1)))


@lru_cache(maxsize=1)
def torchvision_architectures() -> tuple[str, ...]:
    """Names of torchvision's image classifiers (resnet18, mobilenet_v3_small, ...)."""
    models = _torchvision().models
    return tuple(models.list_models(module=models))


def available_architectures() -> tuple[str, ...]:
    return (DEFAULT_ARCHITECTURE, *torchvision_architectures())


def check_architecture(architecture: str, in_channels: int) -> None:
    """Raises UnknownArchitecture / ValueError when a model cannot be built as configured."""
    if architecture == DEFAULT_ARCHITECTURE:
        return
    if architecture not in torchvision_architectures():
        raise UnknownArchitecture(
            f"unknown architecture {architecture!r}; use {DEFAULT_ARCHITECTURE!r} or a torchvision "
            f"classifier such as resnet18, mobilenet_v3_small, efficientnet_b0 "
            f"(all: torchvision.models.list_models(module=torchvision.models))"
        )
    if in_channels != 3:
        raise ValueError(
            f"torchvision architecture {architecture!r} takes 3 input channels, not {in_channels}"
        )


def check_model_config(config: ModelConfig) -> None:
    """Raises InvalidModelConfig unless torchvision can build the network `config` names.

    The schema checks what a config says; this checks that the architecture and the pretrained
    weights it names exist (torchvision's knowledge, hence here).
    """
    problems = []
    if config.format != "state_dict":  # a self-contained network: nothing for torchvision to build
        return
    try:
        check_architecture(config.architecture, config.channels)
    except ValueError as error:
        problems.append(str(error))
    else:
        if config.pretrained is not None:
            try:
                parse_pretrained(config.architecture, config.pretrained)
            except ValueError as error:
                problems.append(str(error))
    if problems:
        raise InvalidModelConfig("invalid model config: " + "; ".join(problems))


def build_model(
    architecture: str, num_classes: int, in_channels: int, pretrained: str | None = None
) -> nn.Module:
    """A freshly initialised network, or a pretrained one with a new head when pretrained is set.

    pretrained is a spec like "torchvision:DEFAULT" or "torchvision:IMAGENET1K_V1".
    """
    check_architecture(architecture, in_channels)
    if pretrained is not None:
        return _pretrained_torchvision(architecture, num_classes, pretrained)
    if architecture == DEFAULT_ARCHITECTURE:
        return SnapNet(num_classes, in_channels)
    network: nn.Module = _torchvision().models.get_model(architecture, weights=None, num_classes=num_classes)
    return network


def parse_pretrained(architecture: str, spec: str) -> torchvision.models.WeightsEnum:
    """'torchvision:DEFAULT' -> the architecture's weights enum member; clear errors otherwise."""
    if not spec.startswith(PRETRAINED_PREFIX):
        raise ValueError(f"pretrained weights spec {spec!r} must look like '{PRETRAINED_PREFIX}DEFAULT'")
    if architecture == DEFAULT_ARCHITECTURE:
        raise ValueError(f"{DEFAULT_ARCHITECTURE!r} has no pretrained weights; give a weights file")
    enum_name = spec.removeprefix(PRETRAINED_PREFIX)
    weights_enum = _torchvision().models.get_model_weights(architecture)
    try:
        return weights_enum[enum_name]
    except KeyError:
        known = ", ".join(weights_enum.__members__)
        raise ValueError(
            f"{architecture!r} has no pretrained weights {enum_name!r}; known: {known}"
        ) from None


def _pretrained_torchvision(architecture: str, num_classes: int, spec: str) -> nn.Module:
    weights = parse_pretrained(architecture, spec)
    try:
        model: nn.Module = _torchvision().models.get_model(architecture, weights=weights)
    except Exception as error:  # urllib/HTTP/SSL/hash errors all mean the same thing to an operator
        raise PretrainedWeightsUnavailable(
            f"could not load pretrained weights {weights} for {architecture!r} from {weights.url} "
            f"({type(error).__name__}: {error}). The machine may be offline: download the file into "
            f"$TORCH_HOME/hub/checkpoints/ beforehand, or point the model config at a saved weights file."
        ) from error
    replace_classifier_head(model, num_classes)
    return model


def replace_classifier_head(model: nn.Module, num_classes: int) -> None:
    """Swaps the last Linear layer (fc, classifier[-1], heads.head, ...) for one with num_classes."""
    last_linear = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last_linear = (name, module)
    if last_linear is None:
        raise ValueError(f"{type(model).__name__} has no Linear classifier head to replace")
    name, old = last_linear
    parent_name, _, attribute = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attribute, nn.Linear(old.in_features, num_classes, bias=old.bias is not None))
