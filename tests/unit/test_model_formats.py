"""Model formats (issue 19): TorchScript, torch.export and ONNX versions added with
`snaplearn-vision models add`, checked at load, warmed, released; broken files refused with a
message that names the file and the mismatch. Real exported networks, no mocks."""

from __future__ import annotations

import gc
import io
import json
import re
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from snaplearn_common.errors import FailedPrecondition
from snaplearn_vision import models
from snaplearn_vision.runtime.decoding import decode_pixels
from snaplearn_vision.runtime.engine import warm_up_batch_sizes
from snaplearn_vision.runtime.formats import ModelLoadError
from snaplearn_vision.runtime.model_repository import ModelRepository
from snaplearn_vision.schema import DecodeSpec, ModelConfig
from tests.helpers.model_formats import (
    COLOUR_LABELS,
    SIZE,
    ColourNet,
    colour_photo,
    export_onnx,
    export_program,
    export_torchscript,
    write_labels,
)

EXPORTERS = {"torchscript": export_torchscript, "torch_export": export_program, "onnx": export_onnx}
SUFFIX = {"torchscript": ".pt", "torch_export": ".pt2", "onnx": ".onnx"}
# Pixels reach ColourNet as 0..1.
PREPROCESSING = ["--input-size", str(SIZE), str(SIZE), "--mean", "0", "0", "0", "--std", "1", "1", "1"]


def add(root: Path, name: str, file: Path, labels: Path, *extra: str) -> int:
    return models.main(
        ["--repository", str(root), "add", name, "--file", str(file), "--labels", str(labels), *extra]
    )


def assert_nothing_left(root: Path, name: str) -> None:
    model_dir = root / name
    assert not model_dir.exists() or sorted(p.name for p in model_dir.iterdir()) == []


@pytest.mark.parametrize("model_format", sorted(EXPORTERS))
def test_each_format_added_then_classifies_like_the_network(
    model_format: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file = EXPORTERS[model_format](tmp_path / f"colour{SUFFIX[model_format]}")
    labels = write_labels(tmp_path / "labels.txt")
    assert add(tmp_path / "repo", "colour", file, labels, *PREPROCESSING) == 0
    out = capsys.readouterr().out
    assert f"added colour version 1: {model_format}, 3 labels, input 3x16x16" in out
    assert "tested at batch sizes 1, 2" in out

    config = json.loads((tmp_path / "repo" / "colour" / "1" / "config.json").read_text())
    assert config["format"] == model_format
    assert config["labels"] == list(COLOUR_LABELS)
    classifier = ModelRepository(tmp_path / "repo").load("colour", device="cpu")
    assert classifier.format == model_format
    for rgb, expected in (((250, 10, 10), "red"), ((10, 240, 10), "green"), ((5, 5, 230), "blue")):
        (label, score), *_ = classifier.classify(colour_photo(rgb), k=3)
        assert label == expected
        assert score > 0.99
    # The batch path (the server's) agrees with the network run directly on the same pixels.
    photos = [colour_photo((200, 100, 50)), colour_photo((20, 90, 160))]
    pixels = [classifier.decode_pixels(photo) for photo in photos]
    batched = classifier.predict_pixels(pixels)
    with torch.no_grad():
        inputs = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 255
        direct = torch.softmax(ColourNet()(inputs), dim=1).numpy()
    np.testing.assert_allclose(batched, direct, atol=1e-5)


def test_format_and_input_come_from_the_file_when_not_given(tmp_path: Path) -> None:
    file = export_onnx(tmp_path / "net.onnx")
    assert (
        add(
            tmp_path / "repo",
            "net",
            file,
            write_labels(tmp_path / "l.txt"),
            "--mean",
            "0",
            "0",
            "0",
            "--std",
            "1",
            "1",
            "1",
        )
        == 0
    )
    config = ModelRepository(tmp_path / "repo").load_config("net")
    assert (config.format, config.channels, config.input_size) == ("onnx", 3, (SIZE, SIZE))


def test_versions_are_numbered_listed_and_removed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "repo"
    labels = write_labels(tmp_path / "labels.txt")
    assert add(root, "colour", export_torchscript(tmp_path / "a.pt"), labels, *PREPROCESSING) == 0
    assert add(root, "colour", export_onnx(tmp_path / "b.onnx"), labels, *PREPROCESSING) == 0
    capsys.readouterr()
    assert models.main(["--repository", str(root), "list", "--json", "--check"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["version"], r["format"], r["file"], r["state"]) for r in rows] == [
        ("1", "torchscript", "model.pt", "ready"),
        ("2", "onnx", "model.onnx", "ready"),
    ]
    assert models.main(["remove", "colour", "1", "--repository", str(root)]) == 0  # either place
    assert ModelRepository(root).list_versions("colour") == ["2"]
    assert sorted(p.name for p in (root / "colour").iterdir()) == ["2"]  # nothing hidden left
    assert models.main(["--repository", str(root), "remove", "colour", "1"]) == 1
    assert "has no version '1'; available versions: 2" in capsys.readouterr().err


def test_a_broken_version_says_what_is_wrong_in_the_listing(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    labels = write_labels(tmp_path / "labels.txt")
    assert add(root, "colour", export_onnx(tmp_path / "a.onnx"), labels, *PREPROCESSING) == 0
    (root / "colour" / "1" / "model.onnx").write_bytes(b"not onnx")
    (row,) = models.list_versions(root, check=True)
    assert row.state.startswith("broken: colour/1: model.onnx (ONNX) is not a loadable ONNX model")


class Fixed2(torch.nn.Module):
    """Reshapes to a batch of exactly 2: what a trace at one batch size bakes in."""

    def __init__(self) -> None:
        super().__init__()
        self.net = ColourNet()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).reshape(2, 3)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        (
            "onnx fixed batch",
            r"colour/1: model\.onnx \(ONNX\) has a fixed batch dimension of 2; .*dynamic batch",
        ),
        (
            "onnx channels",
            r"colour/1: model\.onnx \(ONNX\) takes 1 input channels, but config\.json has channels 3",
        ),
        (
            "export size",
            r"model.pt2 \(ExportedProgram\) takes 16x16 images, but config.json has input_size \[32, 32\]",
        ),
        (
            "export labels",
            r"model.pt2 \(ExportedProgram\) returns 3 scores per image, but config.json has 4 labels",
        ),
        (
            "torchscript labels",
            r"colour/1: model\.pt \(TorchScript\) returns 3 scores per image, but config\.json has 4 labels",
        ),
        (
            "torchscript batch",
            r"colour/1: model\.pt \(TorchScript\) failed on a batch of 1 \[3, 16, 16\] images",
        ),
        ("not an archive", r"colour/1: model\.pt2 \(ExportedProgram\) is not a saved torch\.export program"),
    ],
)
def test_a_broken_model_is_refused_naming_the_file_and_the_mismatch(
    case: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    labels = write_labels(tmp_path / "labels.txt")
    options = list(PREPROCESSING)
    if case == "onnx fixed batch":
        file = export_onnx(tmp_path / "m.onnx", dynamic_batch=False)
    elif case == "onnx channels":
        file = export_onnx(tmp_path / "m.onnx", channels=1)
        options += ["--channels", "3"]
    elif case == "export size":
        file = export_program(tmp_path / "m.pt2")
        options[1:3] = ["32", "32"]
    elif case == "export labels":
        file = export_program(tmp_path / "m.pt2")
        labels = write_labels(tmp_path / "labels4.txt", (*COLOUR_LABELS, "white"))
    elif case == "torchscript labels":
        file = export_torchscript(tmp_path / "m.pt")
        labels = write_labels(tmp_path / "labels4.txt", (*COLOUR_LABELS, "white"))
    elif case == "torchscript batch":
        file = export_torchscript(tmp_path / "m.pt", Fixed2())
    else:
        file = tmp_path / "m.pt2"
        file.write_bytes(b"\x00" * 64)
    assert add(tmp_path / "repo", "colour", file, labels, *options) == 1
    error = capsys.readouterr().err
    assert error.startswith("error: ")
    assert re.search(message, error), error
    assert str(tmp_path) not in error  # no server paths
    assert_nothing_left(tmp_path / "repo", "colour")  # neither a version nor its staging folder


def test_load_errors_are_failed_preconditions(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    assert (
        add(
            root, "colour", export_onnx(tmp_path / "a.onnx"), write_labels(tmp_path / "l.txt"), *PREPROCESSING
        )
        == 0
    )
    (root / "colour" / "1" / "model.onnx").unlink()
    with pytest.raises(ModelLoadError, match=r"^colour/1: model\.onnx \(ONNX\) is missing") as raised:
        ModelRepository(root).load("colour")
    assert isinstance(raised.value, FailedPrecondition)


def test_warm_up_runs_every_batch_size_the_batcher_sends(tmp_path: Path) -> None:
    assert warm_up_batch_sizes(1) == (1,)
    assert warm_up_batch_sizes(32) == (1, 2, 4, 8, 16, 32)
    assert warm_up_batch_sizes(24) == (1, 2, 4, 8, 16, 24)
    root = tmp_path / "repo"
    assert (
        add(
            root,
            "colour",
            export_program(tmp_path / "a.pt2"),
            write_labels(tmp_path / "l.txt"),
            *PREPROCESSING,
            "--max-batch-size",
            "8",
        )
        == 0
    )
    classifier = ModelRepository(root).load("colour", device="cpu")
    assert sorted(classifier.warm_up()) == [1, 2, 4, 8]
    assert sorted(classifier.warm_up(max_batch_size=12)) == [1, 2, 4, 8, 12]  # a server override


@pytest.mark.parametrize("model_format", sorted(EXPORTERS))
def test_close_gives_the_network_back(model_format: str, tmp_path: Path) -> None:
    root = tmp_path / "repo"
    file = EXPORTERS[model_format](tmp_path / f"m{SUFFIX[model_format]}")
    assert add(root, "colour", file, write_labels(tmp_path / "l.txt"), *PREPROCESSING) == 0
    classifier = ModelRepository(root).load("colour", device="cpu")
    classifier.warm_up()
    held: Any = classifier.model
    network = weakref.ref(held.session if model_format == "onnx" else held)
    del held
    classifier.close()
    gc.collect()
    assert network() is None  # gone although the classifier object itself is still referenced
    assert classifier.closed
    with pytest.raises(RuntimeError, match="released"):
        classifier.predict_pixels([np.zeros((SIZE, SIZE, 3), np.uint8)])
    classifier.close()  # idempotent


def test_center_crop_keeps_the_middle_and_stretch_the_whole(tmp_path: Path) -> None:

    wide = Image.new("RGB", (300, 100), (0, 0, 0))
    wide.paste((255, 255, 255), (100, 0, 200, 100))  # a white square in the middle
    buffer = io.BytesIO()
    wide.save(buffer, format="PNG")
    cropped = decode_pixels(DecodeSpec(3, 16, 16, resize="center_crop"), buffer.getvalue())
    stretched = decode_pixels(DecodeSpec(3, 16, 16), buffer.getvalue())
    # Only the white middle (the resize filter reaches a little past the crop at its edges).
    assert cropped[:, 1:-1].min() == 255 and cropped.min() > 200
    assert stretched[:, :4].max() < 20 and stretched[:, 7:9].min() > 240
    config = ModelConfig.from_dict(
        {
            "format": "onnx",
            "labels": ["a"],
            "channels": 3,
            "mean": [0, 0, 0],
            "std": [1, 1, 1],
            "resize": "center_crop",
        }
    )
    assert config.architecture == "" and config.weights == "model.onnx"


def test_old_config_without_format_is_a_state_dict() -> None:
    config = ModelConfig.from_dict({"architecture": "snapnet", "labels": ["a", "b"]})
    assert (config.format, config.weights, config.resize) == ("state_dict", "model.pt", "stretch")
    with pytest.raises(ValueError, match="architecture must be a non-empty string"):
        ModelConfig.from_dict({"labels": ["a"], "architecture": ""})
    with pytest.raises(ValueError, match="format must be one of"):
        ModelConfig.from_dict({"labels": ["a"], "format": "tflite"})


def test_min_confidence_is_declared_and_checked(tmp_path: Path) -> None:
    config = ModelConfig.from_dict({"architecture": "snapnet", "labels": ["a"], "min_confidence": 0.4})
    assert config.min_confidence == 0.4
    assert ModelConfig.from_dict(config.to_dict()) == config
    for bad in (1.5, float("nan"), "high", True):
        with pytest.raises(ValueError, match="min_confidence must be"):
            ModelConfig("snapnet", ("a",), min_confidence=bad)  # type: ignore[arg-type]
    root = tmp_path / "repo"
    file = export_onnx(tmp_path / "a.onnx")
    labels = write_labels(tmp_path / "l.txt")
    assert add(root, "colour", file, labels, *PREPROCESSING, "--min-confidence", "0.6") == 0
    assert ModelRepository(root).load_config("colour").min_confidence == 0.6


def test_an_exported_batch_bound_below_the_batchers_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file = export_program(tmp_path / "m.pt2", max_batch=4)
    labels = write_labels(tmp_path / "l.txt")
    assert add(tmp_path / "repo", "colour", file, labels, *PREPROCESSING, "--max-batch-size", "8") == 1
    assert (
        "model.pt2 (ExportedProgram) accepts batches of at most 4, but config.json has "
        "batching.max_batch_size 8" in capsys.readouterr().err
    )
    assert add(tmp_path / "repo", "colour", file, labels, *PREPROCESSING, "--max-batch-size", "4") == 0


def test_onnx_weights_kept_beside_the_graph_travel_with_it(tmp_path: Path) -> None:
    """torch.onnx's exporter keeps weights in "<file>.data", named inside the graph."""
    network = ColourNet().eval()
    batch = torch.export.Dim("batch", min=1, max=1024)
    path = tmp_path / "big.onnx"
    torch.onnx.export(
        network, (torch.rand(2, 3, SIZE, SIZE),), str(path), dynamic_shapes={"x": {0: batch}},
        external_data=True, dynamo=True, verbose=False,
    )  # fmt: skip
    assert (tmp_path / "big.onnx.data").is_file()
    root = tmp_path / "repo"
    assert add(root, "colour", path, write_labels(tmp_path / "l.txt"), *PREPROCESSING) == 0
    files = sorted(p.name for p in (root / "colour" / "1").iterdir())
    assert files == ["big.onnx.data", "config.json", "model.onnx"]
    classifier = ModelRepository(root).load("colour", device="cpu")
    assert classifier.classify(colour_photo((240, 10, 10)), k=1)[0][0] == "red"
