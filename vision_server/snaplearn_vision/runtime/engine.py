"""A loaded, ready-to-serve image classifier: bytes -> pixels -> probabilities.

The serving path is decode_pixels() (decoding.py) on the decode threads (one call per
request: bytes -> uint8 [H, W, C] at the model's input size) and predict_pixels() on the
batcher's model thread (one call per batch): the images are copied once into a preallocated
(pinned, on CUDA) uint8 batch buffer, and the float conversion, normalisation and NHWC -> NCHW
layout change happen for the whole batch inside torch, on the model's device. Pillow cannot
decode into a caller's buffer, so that one uint8 copy per image is the only copy on the host.

decode() + predict() (normalised float32 [C, H, W] per image) remain for tools and tests.

Every format (runtime/formats.py) runs behind the same batch path: torch modules (a state_dict's
network, TorchScript, an exported program) on the model's device, ONNX in onnxruntime on a host
float32 batch. A version is usable after check() (the loader runs it: probe batches of 1 and 2)
and warm_up() (every batch size the batcher will send, powers of two up to the max, and the max);
close() gives its memory back.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from snaplearn_common.errors import InvalidInput
from snaplearn_vision.runtime.decoding import decode_pixels
from snaplearn_vision.runtime.formats import FORMAT_TITLES, ModelLoadError, Network, OnnxNetwork, short_error
from snaplearn_vision.runtime.ranking import ranking
from snaplearn_vision.schema import (
    DEFAULT_MAX_IMAGE_BYTES,
    DEFAULT_MAX_IMAGE_PIXELS,
    DEVICES,
    PRECISIONS,
    DecodeSpec,
    DeviceChoice,
    ModelConfig,
    Precision,
)

log = logging.getLogger(__name__)

_TORCH_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def warm_up_batch_sizes(max_batch_size: int) -> tuple[int, ...]:
    """The batch sizes a warm-up runs: powers of two below the max, and the max itself."""
    sizes = []
    size = 1
    while size < max_batch_size:
        sizes.append(size)
        size *= 2
    sizes.append(max(1, max_batch_size))
    return tuple(sizes)


class OutputShapeError(RuntimeError):
    """The network returned something other than [rows, labels]."""

    def __init__(self, message: str, shape: tuple[int, ...]) -> None:
        super().__init__(message)
        self.shape = shape


def _released(_: torch.Tensor) -> torch.Tensor:
    raise RuntimeError("this model version was released (close()) and can no longer predict")


def resolve_device(choice: str) -> torch.device:
    """'auto' picks CUDA when available; 'cuda' without CUDA is an error, not a silent fallback."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch.cuda.is_available() is False")
    if choice not in DEVICES:
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', not {choice!r}")
    return torch.device(choice)


@dataclass(frozen=True, slots=True)
class InferenceSettings:
    """How the model runs. The GPU-only ones are ignored on CPU (logged once at load).

    precision: "fp16"/"bf16" run the model in half precision (CUDA only: without AMX-class
        hardware the CPU runs them slower than fp32, so the CPU path keeps fp32).
    channels_last: NHWC memory format for model and inputs ("auto": on; it is what oneDNN and
        cuDNN convolutions prefer, and the decoded pixels are NHWC already).
    compile: torch.compile the model (CUDA only: Inductor's CPU backend needs a C++ toolchain
        at run time and a long compilation).
    pin_memory: page-locked host batch buffer, so host -> GPU copies are asynchronous (CUDA only).
    torchscript: trace and freeze the model at load (unless compiled). The frozen graph runs in
        C++ without taking the GIL between operators (eager PyTorch takes it for every one),
        so decode threads and the event loop no longer stall the model, nor it them. Models
        that cannot be traced run eager (logged).
    flush_denormals: flush denormal floats to zero on the model thread (CPU); untrained or
        fine-tuned weights can produce denormals, which x86 convolutions compute very slowly.
    """

    precision: Precision = "fp32"
    channels_last: bool = True
    compile: bool = False
    pin_memory: bool = True
    flush_denormals: bool = True
    torchscript: bool = True

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")


class ImageClassifier:
    """One version of one model, on one device, with its pre- and post-processing."""

    def __init__(
        self,
        name: str,
        version: str,
        config: ModelConfig,
        model: Network,
        device: DeviceChoice | str = "auto",
        max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        inference: InferenceSettings | None = None,
    ) -> None:
        self.name = name
        self.version = version
        self.config = config
        self.labels: tuple[str, ...] = tuple(config.labels)
        self.format = config.format
        # onnxruntime takes host arrays (and picked its execution provider at load), so the
        # batch is prepared on the host as contiguous NCHW float32 whatever the device.
        self._external = isinstance(model, OnnxNetwork)
        self.device = torch.device("cpu") if self._external else resolve_device(device)
        self.max_image_bytes = max_image_bytes
        self.max_image_pixels = max_image_pixels
        self._decode_spec = DecodeSpec(
            config.channels,
            *config.input_size,
            max_image_bytes=max_image_bytes,
            max_image_pixels=max_image_pixels,
            resize=config.resize,
        )
        requested = inference or InferenceSettings()
        if self._external:
            requested = InferenceSettings(
                channels_last=False, compile=False, torchscript=False, flush_denormals=False
            )
        self.inference = self._effective(requested)
        self._dtype = _TORCH_DTYPES[self.inference.precision]
        self._closed = False
        memory_format = torch.channels_last if self.inference.channels_last else torch.contiguous_format
        self.model: Network | None
        self._forward: Callable[[torch.Tensor], torch.Tensor]
        if isinstance(model, OnnxNetwork):
            self.model = model
            self._forward = model
        else:
            module = model.to(self.device, dtype=self._dtype).to(memory_format=memory_format)
            if config.format != "torch_export":  # an exported program's module refuses eval()
                module = module.eval()
            self.model = module
            self._forward = module
            if self.inference.compile:
                self._forward = torch.compile(module)
            elif self.inference.torchscript and config.format != "torch_export":
                # An exported program is already one flat graph of aten operators; tracing its
                # module is not supported, so it runs as it is.
                self._forward = self._traced(module, memory_format)
        self._mean = np.asarray(config.mean, dtype=np.float32).reshape(-1, 1, 1) * 255
        self._scale = 1.0 / (np.asarray(config.std, dtype=np.float32).reshape(-1, 1, 1) * 255)
        # The same normalisation as decode(), as [1, C, 1, 1] tensors on the device.
        self._mean_t = torch.from_numpy(self._mean[None]).to(self.device, self._dtype)
        self._scale_t = torch.from_numpy(self._scale[None]).to(self.device, self._dtype)
        self._staging = threading.local()  # per model thread: its uint8 batch buffer

    def _effective(self, settings: InferenceSettings) -> InferenceSettings:
        """The settings as they apply on this device; what is ignored on CPU is logged."""
        if self.device.type == "cuda":
            return settings
        ignored = []
        if settings.precision != "fp32":
            ignored.append(f"precision={settings.precision}")
        if settings.compile:
            ignored.append("compile")
        if ignored:
            log.info("model %s/%s on CPU: ignoring GPU-only settings %s", self.name, self.version, ignored)
        return InferenceSettings(
            precision="fp32",
            channels_last=settings.channels_last,
            compile=False,
            pin_memory=False,
            flush_denormals=settings.flush_denormals,
            torchscript=settings.torchscript,
        )

    def _traced(
        self, module: torch.nn.Module, memory_format: torch.memory_format
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        example = torch.zeros((1, *self.input_shape), dtype=self._dtype, device=self.device)
        try:
            # torch.jit warns that it is deprecated for torch.compile, whose CPU backend needs a
            # C++ toolchain at run time; should jit go away, the except below runs models eager.
            # catch_warnings is process-wide, but this runs once per model load.
            with torch.no_grad(), warnings.catch_warnings():
                warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit.*deprecated")
                if isinstance(module, torch.jit.ScriptModule):  # TorchScript already: freeze only
                    return torch.jit.freeze(module)
                traced = torch.jit.trace(module, example.contiguous(memory_format=memory_format))
                return torch.jit.freeze(traced)
        except Exception as error:  # an architecture with data-dependent control flow
            log.warning("model %s/%s cannot be traced (%s); running it eager", self.name, self.version, error)
            return module

    def __repr__(self) -> str:
        return (
            f"ImageClassifier({self.name!r}, version={self.version!r}, format={self.format!r}, "
            f"device={self.device})"
        )

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one decoded image."""
        return (self.config.channels, *self.config.input_size)

    def decode(self, image_bytes: bytes) -> np.ndarray:
        """Encoded image (JPEG, PNG, ...) -> normalised float32 [C, H, W]. Raises InvalidInput."""
        chw = self.decode_pixels(image_bytes).transpose(2, 0, 1).astype(np.float32)
        return np.ascontiguousarray((chw - self._mean) * self._scale)

    @property
    def decode_spec(self) -> DecodeSpec:
        """What a decode thread needs to turn this model's photos into pixels."""
        return self._decode_spec

    def decode_pixels(self, image_bytes: bytes) -> np.ndarray:
        """Encoded image (JPEG, PNG, ...) -> uint8 [H, W, C] at the input size. Raises InvalidInput."""
        return decode_pixels(self._decode_spec, image_bytes)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """float32 [N, C, H, W] (from decode) -> float32 [N, num_labels] softmax probabilities."""
        if batch.ndim != 4 or tuple(batch.shape[1:]) != self.input_shape:
            raise ValueError(f"batch must be [N, {', '.join(map(str, self.input_shape))}], got {batch.shape}")
        rows = batch.shape[0]
        if rows == 0:
            return np.empty((0, len(self.labels)), dtype=np.float32)
        inputs = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
        with torch.inference_mode():
            if self.device.type == "cuda":
                # Pinned host memory lets the copy run asynchronously with the launch.
                inputs = inputs.pin_memory().to(self.device, non_blocking=True)
            if self.inference.channels_last:
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            return self._run(inputs.to(self._dtype), rows)

    def predict_pixels(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """uint8 [H, W, C] images (from decode_pixels) -> float32 [N, num_labels] probabilities.

        Runs on a model thread: the images are copied into that thread's reusable batch buffer,
        then converted and normalised as one tensor on the model's device.
        """
        rows = len(images)
        if rows == 0:
            return np.empty((0, len(self.labels)), dtype=np.float32)
        channels, height, width = self.input_shape
        buffer = self._batch_buffer(rows, (height, width, channels))
        staged = buffer[:rows]
        try:
            np.stack(images, out=staged.numpy())
        except ValueError:
            shapes = sorted({tuple(image.shape) for image in images})
            raise ValueError(f"images must be uint8 [{height}, {width}, {channels}], got {shapes}") from None
        with torch.inference_mode():
            pixels = staged
            if self.device.type == "cuda":
                # From pinned memory the copy is asynchronous; the buffer is reused only after
                # the .cpu() below has synchronised, so it is never overwritten mid-copy.
                pixels = pixels.to(self.device, non_blocking=self.inference.pin_memory)
            # NHWC -> NCHW is a view; the float copy keeps its (channels_last) strides.
            inputs = pixels.permute(0, 3, 1, 2).to(self._dtype)
            inputs.sub_(self._mean_t).mul_(self._scale_t)
            if not self.inference.channels_last:
                inputs = inputs.contiguous()
            return self._run(inputs, rows)

    def _batch_buffer(self, rows: int, image_shape: tuple[int, int, int]) -> torch.Tensor:
        state = self._staging
        buffer: torch.Tensor | None = getattr(state, "buffer", None)
        if buffer is None or buffer.shape[0] < rows:
            capacity = max(rows, int(self.config.batching.max_batch_size))
            pin = self.device.type == "cuda" and self.inference.pin_memory
            buffer = torch.empty((capacity, *image_shape), dtype=torch.uint8, pin_memory=pin)
            state.buffer = buffer
        return buffer

    def _run(self, inputs: torch.Tensor, rows: int) -> np.ndarray:
        if not getattr(self._staging, "prepared", False):
            if self.device.type == "cpu" and self.inference.flush_denormals:
                torch.set_flush_denormal(True)  # per thread (MXCSR): this model thread's
            self._staging.prepared = True
        with torch.inference_mode():
            logits = self._forward(inputs)
            if tuple(logits.shape) != (rows, len(self.labels)):
                raise OutputShapeError(
                    f"model {self.name}/{self.version} returned {tuple(logits.shape)} for {rows} inputs; "
                    f"expected ({rows}, {len(self.labels)})",
                    tuple(logits.shape),
                )
            probabilities = torch.softmax(logits.float(), dim=1).cpu().numpy()
        return probabilities

    def top_k(
        self, probabilities: np.ndarray, k: int, order: np.ndarray | None = None
    ) -> list[tuple[str, float]]:
        """The k most probable (label, score) of one row, highest first (ties: label order).

        order: that row's `ranking()`, when the batch already computed it.
        """
        if k < 1:
            raise InvalidInput(f"k must be at least 1, got {k}")
        if order is None:
            order = ranking(probabilities)
        labels = self.labels
        return [(labels[i], float(probabilities[i])) for i in order[:k].tolist()]

    def classify(self, image_bytes: bytes, k: int = 5) -> list[tuple[str, float]]:
        """decode + predict + top_k for one image: for demos and tests, not the serving path."""
        return self.top_k(self.predict(self.decode(image_bytes)[None])[0], k)

    # -- a version's life: checked, warmed, released ---------------------------------------

    def probe(self, rows: int) -> float:
        """One batch of `rows` blank images; returns its seconds. Raises ModelLoadError."""
        channels, height, width = self.input_shape
        blank = np.zeros((height, width, channels), dtype=np.uint8)
        title = FORMAT_TITLES.get(self.format, self.format)
        label = f"{self.name}/{self.version}: {self.config.weights} ({title})"
        started = time.perf_counter()
        try:
            self.predict_pixels([blank] * rows)
        except OutputShapeError as error:
            shape = error.shape
            if len(shape) == 2 and shape[0] == rows:
                raise ModelLoadError(
                    f"{label} returns {shape[1]} scores per image, but config.json has "
                    f"{len(self.labels)} labels"
                ) from None
            raise ModelLoadError(
                f"{label} returned shape {list(shape)} for a batch of {rows}; a classifier returns "
                f"[{rows}, {len(self.labels)}] (one row per image, one score per label)"
            ) from None
        except Exception as error:
            raise ModelLoadError(
                f"{label} failed on a batch of {rows} [{channels}, {height}, {width}] images "
                f"(config.json's channels and input_size): {short_error(error)}"
            ) from error
        return time.perf_counter() - started

    def check(self) -> None:
        """Probe batches of 1 and 2 images (2 when the batcher may send it): does it run, and
        return one score per label for each image? Raises ModelLoadError naming the mismatch."""
        self.probe(1)
        if self.config.batching.max_batch_size >= 2:
            self.probe(2)

    def warm_up(self, max_batch_size: int | None = None) -> dict[int, float]:
        """Runs every batch size the batcher will send (powers of two up to the max, and the
        max) once, so that no first call at a new size pays for lazy initialisation or a new
        kernel plan. Returns seconds per batch size. Raises ModelLoadError.

        max_batch_size: the batcher's limit when the server overrides the model's own.
        """
        limit = max_batch_size if max_batch_size is not None else self.config.batching.max_batch_size
        timings = {}
        for rows in warm_up_batch_sizes(int(limit)):
            timings[rows] = self.probe(rows)
        log.debug("model %s/%s warmed up: %s", self.name, self.version, timings)
        return timings

    def close(self) -> None:
        """Gives this version's memory back (its network, batch buffers and, on CUDA, the
        allocator's cached blocks). Idempotent; predicting afterwards raises RuntimeError.
        Call it once the batcher that used it has stopped."""
        if self._closed:
            return
        self._closed = True
        model: Any = self.model
        self.model = None
        self._forward = _released
        if isinstance(model, OnnxNetwork):
            model.close()
        del model
        self._staging = threading.local()  # drops every thread's batch buffer
        gc.collect()  # the traced graph and the module can hold reference cycles
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
