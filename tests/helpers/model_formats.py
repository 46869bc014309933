"""Tiny networks exported for real in each format the vision server serves (issue 19).

ColourNet answers which of red, green or blue dominates a photo: a 1x1 convolution (identity),
a global mean and a linear head (10 x identity). With mean 0 and std 1 in config.json the
pixels reach it as 0..1, so a pure red photo scores [10, 0, 0]: any format that gets the
preprocessing or the channel order wrong answers something else.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import torch
from PIL import Image
from torch import nn

COLOUR_LABELS = ("red", "green", "blue")
SIZE = 16


class ColourNet(nn.Module):
    def __init__(self, in_channels: int = 3, outputs: int = 3) -> None:
        super().__init__()
        self.mix = nn.Conv2d(in_channels, 3, kernel_size=1, bias=False)
        self.head = nn.Linear(3, outputs)
        with torch.no_grad():
            self.mix.weight.copy_(torch.eye(3, in_channels).reshape(3, in_channels, 1, 1))
            self.head.weight.copy_(10 * torch.eye(outputs, 3))
            self.head.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(torch.mean(self.mix(x), dim=(2, 3)), 1))


def example(batch: int = 2, channels: int = 3) -> torch.Tensor:
    return torch.rand(batch, channels, SIZE, SIZE)


def export_torchscript(path: Path, model: nn.Module | None = None) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
        torch.jit.script((model or ColourNet()).eval()).save(str(path))
    return path


def export_program(
    path: Path, model: nn.Module | None = None, channels: int = 3, max_batch: int = 1024
) -> Path:
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    program = torch.export.export(
        (model or ColourNet(channels)).eval(), (example(channels=channels),), dynamic_shapes={"x": {0: batch}}
    )
    torch.export.save(program, str(path))
    return path


def export_onnx(
    path: Path, model: nn.Module | None = None, dynamic_batch: bool = True, channels: int = 3
) -> Path:
    network = (model or ColourNet(channels)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript-based exporter's notice
        # The TorchScript-based exporter: fast, and a fixed batch unless dynamic_axes says so.
        torch.onnx.export(
            network,
            (example(channels=channels),),
            str(path),
            input_names=["pixels"],
            output_names=["logits"],
            dynamic_axes={"pixels": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None,
            dynamo=False,
        )
    return path


def colour_photo(rgb: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def write_labels(path: Path, labels: tuple[str, ...] = COLOUR_LABELS) -> Path:
    path.write_text("\n".join(labels) + "\n")
    return path
