"""What the vision server knows without torch: the bottom layer, declared once.

A model's config.json (ModelConfig, BatchingConfig), the batcher's validated limits and the
server's overrides of them, what a decode needs of a model (DecodeSpec), the precisions and
devices a model may run on, and the default model's identity. Settings, tools and tests read
these facts without importing torch, torchvision, numpy or Pillow (an import-linter contract
keeps it so); the layers above build on them.

Whether an architecture exists or a pretrained weights spec names real weights is torchvision's
knowledge: snaplearn_vision.runtime.architectures.check_model_config adds those checks.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from snaplearn_common.errors import FailedPrecondition
from snaplearn_common.topics import DEFAULT_TOPICS

# -- the default model -------------------------------------------------------------------------

DEFAULT_MODEL_NAME = "worksheet-topics"
DEFAULT_MODEL_VERSION = "1"
DEFAULT_ARCHITECTURE = "snapnet"
DEFAULT_LABELS: tuple[str, ...] = DEFAULT_TOPICS  # the worksheet topics, shared with the recommender
DEFAULT_INPUT_SIZE = (64, 64)  # (height, width)
# Fixed rather than measured, so the numbers in config.json do not depend on the dataset.
DEFAULT_MEAN = (0.5,)
DEFAULT_STD = (0.25,)

# -- how a model runs --------------------------------------------------------------------------

Precision = Literal["fp32", "fp16", "bf16"]
PRECISIONS: tuple[Precision, ...] = ("fp32", "fp16", "bf16")
DeviceChoice = Literal["auto", "cpu", "cuda"]
DEVICES: tuple[DeviceChoice, ...] = ("auto", "cpu", "cuda")

# -- decoding ----------------------------------------------------------------------------------

DEFAULT_MAX_IMAGE_BYTES = 10 * 1024 * 1024
# A 48-megapixel phone photo is fine; a 1x1-pixel-per-byte PNG "bomb" declaring 100k x 100k is not.
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000


@dataclass(frozen=True, slots=True)
class DecodeSpec:
    """What a decode needs to know of its model: the pixels it wants and the limits it keeps."""

    channels: int
    height: int
    width: int
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    resize: str = "stretch"  # a ResizePolicy (declared below, with the model config)

    def __post_init__(self) -> None:
        if self.resize not in ("stretch", "center_crop"):
            raise ValueError(f"resize must be 'stretch' or 'center_crop', got {self.resize!r}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if self.height < 1 or self.width < 1:
            raise ValueError(f"input size must be positive, got {self.height}x{self.width}")
        if self.max_image_bytes < 1 or self.max_image_pixels < 1:
            raise ValueError("image limits must be >= 1")

    @property
    def shape(self) -> tuple[int, int, int]:
        """(H, W, C) of the decoded pixels."""
        return (self.height, self.width, self.channels)


# -- the model repository's config.json ----------------------------------------------------------

CONFIG_FILENAME = "config.json"
DEFAULT_WEIGHTS_FILENAME = "model.pt"

# How a version's network is stored: a state_dict for `architecture` (SnapNet or torchvision),
# or a self-contained network brought by its owner. Each has its usual file name.
ModelFormat = Literal["state_dict", "torchscript", "torch_export", "onnx"]
MODEL_FORMATS: tuple[ModelFormat, ...] = ("state_dict", "torchscript", "torch_export", "onnx")
FORMAT_FILENAMES: dict[str, str] = {
    "state_dict": DEFAULT_WEIGHTS_FILENAME,
    "torchscript": "model.pt",
    "torch_export": "model.pt2",
    "onnx": "model.onnx",
}
# How a photo becomes input_size: "stretch" resizes it whole (aspect ratio not kept);
# "center_crop" scales its shorter side to fit and crops the middle (ImageNet-style models).
ResizePolicy = Literal["stretch", "center_crop"]
RESIZE_POLICIES: tuple[ResizePolicy, ...] = ("stretch", "center_crop")
PRETRAINED_PREFIX = "torchvision:"
# Names become directory names and arrive in client requests: no separators, no "..".
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
VERSION_PATTERN = re.compile(r"^[1-9][0-9]{0,17}$")


class InvalidModelConfig(ValueError, FailedPrecondition):
    """A config.json (or a ModelConfig built in code) that cannot describe a servable model.

    A FailedPrecondition too: a request for a model whose config is broken asks for something
    that exists but cannot serve until its owner fixes it.
    """


@dataclass(frozen=True)
class BatchingConfig:
    """A model's own limits for the server's dynamic batcher (which owns the semantics)."""

    max_batch_size: int = 32
    max_queue_delay_ms: float = 5.0


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    labels: tuple[str, ...]
    input_size: tuple[int, int] = DEFAULT_INPUT_SIZE  # (height, width)
    channels: int = 1
    mean: tuple[float, ...] = DEFAULT_MEAN
    std: tuple[float, ...] = DEFAULT_STD
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    # A file in the version directory ("" = the format's usual name), or a pretrained spec
    # such as "torchvision:DEFAULT".
    weights: str = ""
    # Free-form provenance: seed, dataset size, test accuracy, ...
    training: dict[str, Any] = field(default_factory=dict)
    format: ModelFormat = "state_dict"
    resize: ResizePolicy = "stretch"
    # Below this top score a photo is "not recognised" (no event published); 0 = off.
    min_confidence: float = 0.0

    def __post_init__(self) -> None:
        if not self.weights and self.format in FORMAT_FILENAMES:
            object.__setattr__(self, "weights", FORMAT_FILENAMES[self.format])
        problems = self._problems()
        if problems:
            raise InvalidModelConfig("invalid model config: " + "; ".join(problems))

    def _problems(self) -> list[str]:
        problems = []
        if self.format not in MODEL_FORMATS:
            problems.append(f"format must be one of {', '.join(MODEL_FORMATS)}, got {self.format!r}")
        if isinstance(self.min_confidence, bool) or not isinstance(self.min_confidence, int | float):
            problems.append(f"min_confidence must be a number in 0..1, got {self.min_confidence!r}")
        elif not 0.0 <= self.min_confidence <= 1.0:  # also rejects NaN
            problems.append(f"min_confidence must be in 0..1 (0 = off), got {self.min_confidence}")
        if self.resize not in RESIZE_POLICIES:
            problems.append(f"resize must be one of {', '.join(RESIZE_POLICIES)}, got {self.resize!r}")
        if not isinstance(self.architecture, str):
            problems.append("architecture must be a string")
        elif self.format == "state_dict" and not self.architecture:
            problems.append("architecture must be a non-empty string (a state_dict needs its network)")
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
            if self.format != "state_dict":
                problems.append(f"pretrained weights need format 'state_dict', not {self.format!r}")
            elif self.architecture == DEFAULT_ARCHITECTURE:
                problems.append(f"{DEFAULT_ARCHITECTURE!r} has no pretrained weights; give a weights file")
        elif not NAME_PATTERN.match(self.weights):
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
        if values.get("format", "state_dict") != "state_dict":
            values.setdefault("architecture", "")  # a self-contained network names none
        try:
            for key in ("labels", "input_size", "mean", "std"):
                if key in values:
                    values[key] = tuple(values[key])
            if "batching" in values:
                values["batching"] = BatchingConfig(**values["batching"])
            return cls(**values)
        except TypeError as error:  # missing required key, or a wrong shape/type
            raise InvalidModelConfig(f"invalid model config: {error}") from None


# -- batching ----------------------------------------------------------------------------------

DEFAULT_MAX_QUEUE_SIZE = 256


@dataclass(frozen=True, slots=True)
class BatchingLimits:
    """Validated batching limits of one model's batcher.

    max_batch_size: the most requests computed together.
    max_queue_delay_s: how long the oldest waiting request may wait for a fuller batch.
    max_queue_size: the most requests waiting (not yet computing); more are rejected.
    """

    max_batch_size: int
    max_queue_delay_s: float
    max_queue_size: int

    def __post_init__(self) -> None:
        if isinstance(self.max_batch_size, bool) or not isinstance(self.max_batch_size, int):
            raise ValueError(f"max_batch_size must be an int, got {self.max_batch_size!r}")
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if not self.max_queue_delay_s >= 0:  # also rejects NaN
            raise ValueError(f"max_queue_delay_s must be >= 0, got {self.max_queue_delay_s}")
        if math.isinf(self.max_queue_delay_s):
            raise ValueError("max_queue_delay_s must be finite")
        if isinstance(self.max_queue_size, bool) or not isinstance(self.max_queue_size, int):
            raise ValueError(f"max_queue_size must be an int, got {self.max_queue_size!r}")
        if self.max_queue_size < 1:
            raise ValueError(f"max_queue_size must be >= 1, got {self.max_queue_size}")


@dataclass(frozen=True, slots=True)
class BatchingOverrides:
    """Server-side overrides of a model's own batching config; None keeps the model's value."""

    max_batch_size: int | None = None
    max_queue_delay_ms: float | None = None
    max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE

    def limits_for(self, batching: BatchingConfig) -> BatchingLimits:
        batch_size = self.max_batch_size if self.max_batch_size is not None else batching.max_batch_size
        delay_ms = (
            self.max_queue_delay_ms if self.max_queue_delay_ms is not None else batching.max_queue_delay_ms
        )
        return BatchingLimits(
            max_batch_size=int(batch_size),
            max_queue_delay_s=float(delay_ms) / 1000.0,
            max_queue_size=self.max_queue_size,
        )
