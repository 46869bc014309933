"""A loaded, ready-to-serve image classifier: bytes -> pixels -> probabilities.

decode() runs on a thread pool (one call per request); predict() runs on the batcher's single
model thread (one call per batch). They share no mutable state.
"""

from __future__ import annotations

import io
from functools import lru_cache
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from snaplearn_common.errors import InvalidInput

if TYPE_CHECKING:
    from snaplearn_vision.model_repository import ModelConfig

DeviceChoice = Literal["auto", "cpu", "cuda"]

DEFAULT_MAX_IMAGE_BYTES = 10 * 1024 * 1024
# A 48-megapixel phone photo is fine; a 1x1-pixel-per-byte PNG "bomb" declaring 100k x 100k is not.
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000
# Formats phones and browsers produce. Older Pillows open many phone JPEGs as "MPO"; newer
# ones fold it into "JPEG" and no longer know the name, hence the filter in _open_formats.
ACCEPTED_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "BMP", "GIF", "TIFF")


@lru_cache(maxsize=1)
def _open_formats() -> tuple[str, ...]:
    Image.init()  # registers the plugins; Image.open would do it on first use anyway
    return tuple(name for name in ACCEPTED_FORMATS if name in Image.OPEN)


def resolve_device(choice: str) -> torch.device:
    """'auto' picks CUDA when available; 'cuda' without CUDA is an error, not a silent fallback."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch.cuda.is_available() is False")
    if choice not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', not {choice!r}")
    return torch.device(choice)


def _flatten_alpha(image: Image.Image) -> Image.Image:
    """Transparent pixels become white paper, not black (screenshots, scanned PNGs)."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # 16-bit/float greyscale: rescale to 8 bits instead of letting convert() clip to white.
        pixels = np.asarray(image, dtype=np.float32)
        low, high = float(pixels.min()), float(pixels.max())
        scaled = (pixels - low) * (255.0 / (high - low) if high > low else 0.0)
        return Image.fromarray(scaled.astype(np.uint8), "L")
    return image


def to_model_pixels(image: Image.Image, channels: int, input_size: tuple[int, int]) -> np.ndarray:
    """Any PIL image -> uint8 [H, W, C] at the model's input size (the shared preprocessing).

    The training set goes through this too, so the model trains on what it is served.
    """
    height, width = input_size
    image = _flatten_alpha(image).convert("L" if channels == 1 else "RGB")
    resized = image.resize((width, height), Image.Resampling.BILINEAR)
    pixels = np.asarray(resized, dtype=np.uint8)
    return pixels[:, :, None] if channels == 1 else pixels


class ImageClassifier:
    """One version of one model, on one device, with its pre- and post-processing."""

    def __init__(
        self,
        name: str,
        version: str,
        config: ModelConfig,
        model: torch.nn.Module,
        device: DeviceChoice | str = "auto",
        max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> None:
        self.name = name
        self.version = version
        self.config = config
        self.labels: tuple[str, ...] = tuple(config.labels)
        self.device = resolve_device(device)
        self.max_image_bytes = max_image_bytes
        self.max_image_pixels = max_image_pixels
        self.model = model.to(self.device).eval()
        self._mean = np.asarray(config.mean, dtype=np.float32).reshape(-1, 1, 1) * 255
        self._scale = 1.0 / (np.asarray(config.std, dtype=np.float32).reshape(-1, 1, 1) * 255)

    def __repr__(self) -> str:
        return f"ImageClassifier({self.name!r}, version={self.version!r}, device={self.device})"

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one decoded image."""
        return (self.config.channels, *self.config.input_size)

    def decode(self, image_bytes: bytes) -> np.ndarray:
        """Encoded image (JPEG, PNG, ...) -> normalised float32 [C, H, W]. Raises InvalidInput."""
        if not image_bytes:
            raise InvalidInput("image is empty (0 bytes)")
        if len(image_bytes) > self.max_image_bytes:
            raise InvalidInput(
                f"image is {len(image_bytes)} bytes; the limit is {self.max_image_bytes} bytes"
            )
        try:
            # Pillow raises DecompressionBombError itself past twice its own (global) limit;
            # our limit is lower and checked below. No warnings.catch_warnings: not thread-safe.
            image = Image.open(io.BytesIO(image_bytes), formats=_open_formats())
        except Image.DecompressionBombError as error:
            raise InvalidInput(f"image has too many pixels ({error})") from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            raise InvalidInput(
                f"image bytes are not a decodable image (accepted formats: {', '.join(_open_formats())})"
            ) from None
        with image:
            width, height = image.size
            # Checked on the header, before any pixel is decoded.
            if width * height > self.max_image_pixels:
                raise InvalidInput(
                    f"image is {width}x{height} = {width * height} pixels; "
                    f"the limit is {self.max_image_pixels} pixels"
                )
            try:
                # JPEG can decode straight to 1/2, 1/4 or 1/8 scale: far less work for a
                # 12-megapixel photo that will become 64x64. Square target: EXIF may rotate it.
                side = 4 * max(self.config.input_size)
                image.draft("L" if self.config.channels == 1 else "RGB", (side, side))
                upright = ImageOps.exif_transpose(image)
                pixels = to_model_pixels(upright, self.config.channels, self.config.input_size)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
                raise InvalidInput(f"image data is corrupt or truncated ({type(error).__name__})") from None
        chw = pixels.transpose(2, 0, 1).astype(np.float32)
        return np.ascontiguousarray((chw - self._mean) * self._scale)

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
            logits = self.model(inputs)
            probabilities = torch.softmax(logits.float(), dim=1).cpu().numpy()
        if probabilities.shape != (rows, len(self.labels)):
            raise RuntimeError(
                f"model {self.name}/{self.version} returned {probabilities.shape} for {rows} inputs; "
                f"expected ({rows}, {len(self.labels)})"
            )
        return probabilities

    def top_k(self, probabilities: np.ndarray, k: int) -> list[tuple[str, float]]:
        """The k most probable (label, score) of one row, highest first (ties: label order)."""
        if k < 1:
            raise InvalidInput(f"k must be at least 1, got {k}")
        order = np.argsort(-probabilities, kind="stable")[:k]
        return [(self.labels[i], float(probabilities[i])) for i in order]

    def classify(self, image_bytes: bytes, k: int = 5) -> list[tuple[str, float]]:
        """decode + predict + top_k for one image: for demos and tests, not the serving path."""
        return self.top_k(self.predict(self.decode(image_bytes)[None])[0], k)

    def warm_up(self) -> None:
        """One forward pass, so the first real request does not pay for lazy initialisation."""
        self.predict(np.zeros((1, *self.input_shape), dtype=np.float32))
