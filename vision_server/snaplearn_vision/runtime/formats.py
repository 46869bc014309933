"""A model version's network, from whichever format its config.json declares.

    state_dict    model.pt    torch.save(state_dict) for config.architecture (SnapNet, torchvision)
    torchscript   model.pt    torch.jit.save(torch.jit.script/trace(model))
    torch_export  model.pt2   torch.export.save(torch.export.export(model, ..., dynamic_shapes=...))
    onnx          model.onnx  torch.onnx.export(..., dynamic batch axis), run by onnxruntime

Each becomes something the engine runs on a float32 [N, C, H, W] batch that returns [N, labels]
logits: an nn.Module (state_dict, TorchScript, the exported program's module) or an OnnxNetwork.
What the file itself declares about its input and output (the exported program's and the ONNX
graph's shapes) is checked against config.json here, before anything runs; what only running
can tell (TorchScript declares no shapes) is checked by the engine's probe batches.

Every message names the file by its name in the version directory, never by a server path.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from snaplearn_common.errors import FailedPrecondition
from snaplearn_vision.runtime.architectures import build_model
from snaplearn_vision.schema import ModelConfig

log = logging.getLogger(__name__)

FORMAT_TITLES = {
    "state_dict": "state_dict",
    "torchscript": "TorchScript",
    "torch_export": "ExportedProgram",
    "onnx": "ONNX",
}


class ModelLoadError(RuntimeError, FailedPrecondition):
    """The config is valid but the model file is missing, corrupt or does not fit the config.

    The message names the model version, the file (by its name in the version directory) and
    the mismatch, so an operator or a client can act on it without seeing server paths.
    """


_TORCHSCRIPT_TRACEBACK = "The following operation failed in the TorchScript interpreter"


def short_error(error: BaseException) -> str:
    """The first line of an error, bounded: torch's messages can run to pages of graph.

    An error raised inside a TorchScript graph opens with a generic line and a traceback of
    the model's source (with the exporter's paths): its last line is the error itself.
    """
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    text = lines[0]
    if text.startswith(_TORCHSCRIPT_TRACEBACK) and len(lines) > 1:
        text = lines[-1].removeprefix("builtins.")
    return text if len(text) <= 300 else text[:297] + "..."


class OnnxNetwork:
    """An ONNX graph in an onnxruntime session: float32 NCHW in, logits out, on the host.

    The CUDA execution provider is used when the device is CUDA and onnxruntime has it; the
    batch is handed over as host memory either way (onnxruntime copies it to the GPU).
    """

    def __init__(self, session: Any, input_name: str) -> None:
        self.session = session
        self.input_name = input_name

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(inputs.detach().cpu().numpy(), dtype=np.float32)
        (logits,) = self.session.run(None, {self.input_name: array})[:1]
        return torch.from_numpy(np.asarray(logits))

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers())

    def close(self) -> None:
        self.session = None


Network = nn.Module | OnnxNetwork


def load_network(config: ModelConfig, directory: Path, where: str, device: torch.device) -> Network:
    """The network of one version directory; `where` ("name/version") prefixes every message.

    Raises ModelLoadError naming the file and the mismatch.
    """
    path = directory / config.weights
    label = f"{where}: {config.weights} ({FORMAT_TITLES.get(config.format, config.format)})"
    if config.pretrained is None and not path.is_file():
        raise ModelLoadError(f"{label} is missing from the version directory")
    if config.format == "state_dict":
        return _load_state_dict(config, path, label)
    if config.format == "torchscript":
        return _load_torchscript(path, label)
    if config.format == "torch_export":
        return _load_exported(config, path, label)
    if config.format == "onnx":
        return _load_onnx(config, path, label, device)
    raise ModelLoadError(f"{where}: unknown model format {config.format!r}")


def _load_state_dict(config: ModelConfig, path: Path, label: str) -> nn.Module:
    network = build_model(config.architecture, len(config.labels), config.channels, config.pretrained)
    if config.pretrained is None:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)  # weights_only: no pickled code
            network.load_state_dict(state)
        except Exception as error:
            raise ModelLoadError(
                f"cannot load weights {label} into the {config.architecture!r} network: {short_error(error)}"
            ) from error
    return network


def _is_zip(path: Path) -> bool:
    """TorchScript and torch.export archives are zip files; checked first so that a wrong file
    gets one clear message instead of torch's logged tracebacks."""
    with path.open("rb") as file:
        return file.read(4) == b"PK\x03\x04"


def _load_torchscript(path: Path, label: str) -> nn.Module:
    if not _is_zip(path):
        raise ModelLoadError(f"{label} is not a TorchScript archive (torch.jit.save writes a zip file)")
    try:
        with warnings.catch_warnings():
            # torch.jit says it is deprecated; it still loads what users have, and loads once.
            warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit.*deprecated")
            module = torch.jit.load(str(path), map_location="cpu")
    except Exception as error:
        raise ModelLoadError(f"{label} is not a TorchScript archive: {short_error(error)}") from error
    return module


def _load_exported(config: ModelConfig, path: Path, label: str) -> nn.Module:
    if not _is_zip(path):
        raise ModelLoadError(
            f"{label} is not a saved torch.export program (torch.export.save writes a zip file)"
        )
    try:
        program = torch.export.load(str(path))
    except Exception as error:
        raise ModelLoadError(f"{label} is not a saved torch.export program: {short_error(error)}") from error
    inputs = [
        node
        for node in program.graph.nodes
        if node.op == "placeholder" and node.name in set(program.graph_signature.user_inputs)
    ]
    if len(inputs) != 1:
        raise ModelLoadError(f"{label} takes {len(inputs)} inputs; a classifier takes one image batch")
    value = inputs[0].meta.get("val")
    if value is not None:
        shape = list(value.shape)
        _check_input_shape(config, shape, label)
        batch = shape[0]
        if isinstance(batch, int):
            _check_fixed_batch(config, batch, label, "torch.export.Dim on dimension 0 in dynamic_shapes")
        else:
            upper = _symbol_upper_bound(program, batch)
            if upper is not None and upper < config.batching.max_batch_size:
                raise ModelLoadError(
                    f"{label} accepts batches of at most {upper}, but config.json has "
                    f"batching.max_batch_size {config.batching.max_batch_size}"
                )
    outputs = [node for node in program.graph.nodes if node.op == "output"]
    if outputs:
        first = outputs[0].args[0]
        first = first[0] if isinstance(first, list | tuple) and first else first
        meta = getattr(first, "meta", {}).get("val")
        if meta is not None and hasattr(meta, "shape"):
            _check_output_shape(config, list(meta.shape), label)
    return program.module()


def _symbol_upper_bound(program: Any, dimension: Any) -> int | None:
    try:
        ranges = program.range_constraints.get(dimension.node.expr)
        upper = int(ranges.upper) if ranges is not None else None
    except (AttributeError, TypeError, ValueError, OverflowError):  # unbounded (oo) or unknown
        return None
    return upper


def _load_onnx(config: ModelConfig, path: Path, label: str, device: torch.device) -> OnnxNetwork:
    try:
        import onnxruntime
    except ImportError:  # pragma: no cover - a declared dependency of snaplearn-vision
        raise ModelLoadError(f"{label} needs onnxruntime, which is not installed") from None
    options = onnxruntime.SessionOptions()
    # The same number of threads as torch uses (--torch-threads), and no spinning between
    # batches: the decode threads and the event loop need those cores while the model idles.
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    try:
        session = onnxruntime.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as error:
        raise ModelLoadError(f"{label} is not a loadable ONNX model: {short_error(error)}") from error
    session_inputs = session.get_inputs()
    if len(session_inputs) != 1:
        raise ModelLoadError(
            f"{label} takes {len(session_inputs)} inputs; a classifier takes one image batch"
        )
    declared = session_inputs[0]
    if declared.type != "tensor(float)":
        raise ModelLoadError(f"{label} takes {declared.type}; the server feeds tensor(float) (float32)")
    shape = [dim if isinstance(dim, int) else None for dim in declared.shape]
    _check_input_shape(config, shape, label)
    if isinstance(shape[0], int):
        _check_fixed_batch(config, shape[0], label, "dynamic_shapes (or dynamic_axes) on the batch axis")
    output = session.get_outputs()[0]
    _check_output_shape(config, [dim if isinstance(dim, int) else None for dim in output.shape], label)
    log.info("%s runs on onnxruntime with %s", label, session.get_providers())
    return OnnxNetwork(session, declared.name)


def _check_input_shape(config: ModelConfig, shape: Sequence[Any], label: str) -> None:
    """[N, C, H, W] against config.json; a symbolic (None / SymInt) size matches any."""
    if len(shape) != 4:
        raise ModelLoadError(
            f"{label} takes a rank-{len(shape)} input; config.json describes [N, C, H, W] image batches"
        )
    channels, height, width = shape[1:]
    if isinstance(channels, int) and channels != config.channels:
        raise ModelLoadError(
            f"{label} takes {channels} input channels, but config.json has channels {config.channels}"
        )
    expected_h, expected_w = config.input_size
    fixed_h = height if isinstance(height, int) else expected_h
    fixed_w = width if isinstance(width, int) else expected_w
    if (fixed_h, fixed_w) != (expected_h, expected_w):
        raise ModelLoadError(
            f"{label} takes {fixed_h}x{fixed_w} images, but config.json has input_size "
            f"[{expected_h}, {expected_w}]"
        )


def _check_fixed_batch(config: ModelConfig, batch: int, label: str, how: str) -> None:
    if batch == 1 and config.batching.max_batch_size == 1:
        return
    raise ModelLoadError(
        f"{label} has a fixed batch dimension of {batch}; the dynamic batcher sends 1 to "
        f"{config.batching.max_batch_size} images: export it with a dynamic batch dimension "
        f"({how}), or set batching.max_batch_size to 1 for a batch-1 model"
    )


def _check_output_shape(config: ModelConfig, shape: Sequence[Any], label: str) -> None:
    if len(shape) != 2:
        raise ModelLoadError(
            f"{label} returns a rank-{len(shape)} output; a classifier returns [N, labels] scores"
        )
    width = shape[1]
    if isinstance(width, int) and width != len(config.labels):
        raise ModelLoadError(
            f"{label} returns {width} scores per image, but config.json has {len(config.labels)} labels"
        )


def declared_input(model_format: str, path: Path) -> tuple[int | None, int | None, int | None] | None:
    """(C, H, W) as the file itself declares its input (None where symbolic), or None when the
    format declares nothing (state_dict, TorchScript) or the file cannot be read: the loader's
    checks then speak. Used by `models add` to fill in what the user did not say."""
    try:
        if model_format == "onnx":
            import onnxruntime

            session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            shape: list[Any] = list(session.get_inputs()[0].shape)
        elif model_format == "torch_export" and _is_zip(path):
            program = torch.export.load(str(path))
            user_inputs = set(program.graph_signature.user_inputs)
            node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name in user_inputs)
            shape = list(node.meta["val"].shape)
        else:
            return None
    except Exception:
        return None
    if len(shape) != 4:
        return None
    channels, height, width = (dim if isinstance(dim, int) else None for dim in shape[1:])
    return channels, height, width
