"""Trains the default worksheet-topic model on synthetic photos and writes it to a repository.

    python -m snaplearn_vision.train --repository var/models --name worksheet-topics --version 1 --seed 0

Seeded end to end (dataset, split, initialisation, batch order) and run with deterministic
torch kernels, so the same seed on the same machine gives the same model and accuracy.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from snaplearn_vision.runtime.architectures import build_model
from snaplearn_vision.runtime.model_repository import ModelRepository
from snaplearn_vision.schema import (
    DEFAULT_ARCHITECTURE,
    DEFAULT_INPUT_SIZE,
    DEFAULT_LABELS,
    DEFAULT_MEAN,
    DEFAULT_MODEL_NAME,
    DEFAULT_MODEL_VERSION,
    DEFAULT_STD,
    BatchingConfig,
    ModelConfig,
)
from snaplearn_vision.worksheets import make_dataset

MIN_TEST_ACCURACY = 0.95


@dataclass(frozen=True)
class TrainingSettings:
    seed: int = 0
    n_per_class: int = 600
    epochs: int = 8
    batch_size: int = 64
    learning_rate: float = 4e-3
    val_fraction: float = 0.1
    test_fraction: float = 0.15
    input_size: tuple[int, int] = DEFAULT_INPUT_SIZE
    # None: leave torch's thread count alone (tests pin it via OMP_NUM_THREADS).
    num_threads: int | None = None
    progress: bool = True
    # Training below this held-out test accuracy fails instead of writing a model.
    min_test_accuracy: float = MIN_TEST_ACCURACY


@dataclass(frozen=True)
class TrainingResult:
    path: Path
    test_accuracy: float
    val_accuracy: float
    dataset_size: int
    seconds: float


def _split(labels: np.ndarray, settings: TrainingSettings) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stratified train/val/test indices: every class is in every split in the same proportion."""
    rng = np.random.default_rng([settings.seed, 1])
    train, val, test = [], [], []
    for label in np.unique(labels):
        indices = rng.permutation(np.flatnonzero(labels == label))
        n_test = round(len(indices) * settings.test_fraction)
        n_val = round(len(indices) * settings.val_fraction)
        test.append(indices[:n_test])
        val.append(indices[n_test : n_test + n_val])
        train.append(indices[n_test + n_val :])
    return np.concatenate(train), np.concatenate(val), np.concatenate(test)


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, C] -> normalised float32 [N, C, H, W], as ImageClassifier.decode normalises."""
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255)
    mean = torch.tensor(DEFAULT_MEAN).view(1, -1, 1, 1)
    std = torch.tensor(DEFAULT_STD).view(1, -1, 1, 1)
    return (pixels - mean) / std


@torch.inference_mode()
def _accuracy(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    correct = sum(
        int((model(inputs[i : i + 256]).argmax(1) == labels[i : i + 256]).sum())
        for i in range(0, len(labels), 256)
    )
    return correct / max(1, len(labels))


@contextlib.contextmanager
def _deterministic_torch(settings: TrainingSettings) -> Iterator[None]:
    """Seeds and deterministic kernels for the duration of training, then torch's state as it was.

    Restoring matters in a long-lived process (a test session, a server that trains on
    first start): deterministic mode makes some CUDA kernels raise, and threads are shared.
    """
    was_deterministic, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.manual_seed(settings.seed)
    np.random.seed(settings.seed)  # nothing here draws from numpy's global RNG; this guards future code
    torch.use_deterministic_algorithms(True)
    if settings.num_threads is not None:
        torch.set_num_threads(settings.num_threads)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        torch.set_num_threads(threads)


def train_model(settings: TrainingSettings) -> tuple[nn.Module, dict[str, float | int]]:
    """Generates the dataset, trains SnapNet on it (on the CPU) and measures it: (model, metrics)."""
    with _deterministic_torch(settings):
        return _train(settings)


def _train(settings: TrainingSettings) -> tuple[nn.Module, dict[str, float | int]]:
    images, labels = make_dataset(
        settings.n_per_class, settings.seed, settings.input_size, progress=settings.progress
    )
    inputs, targets = _to_tensor(images), torch.from_numpy(labels)
    train_idx, val_idx, test_idx = (torch.from_numpy(i) for i in _split(labels, settings))

    model = build_model(DEFAULT_ARCHITECTURE, len(DEFAULT_LABELS), in_channels=1)
    optimiser = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=1e-4)
    steps_per_epoch = -(-len(train_idx) // settings.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=settings.learning_rate, total_steps=settings.epochs * steps_per_epoch
    )
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.05)
    order_rng = torch.Generator().manual_seed(settings.seed)

    bar = tqdm(
        total=settings.epochs * steps_per_epoch,
        desc="training",
        unit="batch",
        disable=not settings.progress,
        file=sys.stderr,
    )
    for epoch in range(settings.epochs):
        model.train()
        order = train_idx[torch.randperm(len(train_idx), generator=order_rng)]
        for start in range(0, len(order), settings.batch_size):
            batch = order[start : start + settings.batch_size]
            loss = loss_fn(model(inputs[batch]), targets[batch])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            bar.update()
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
    val_accuracy = _accuracy(model, inputs[val_idx], targets[val_idx])
    bar.set_postfix(val_accuracy=f"{val_accuracy:.3f}")
    bar.close()
    metrics: dict[str, float | int] = {
        "val_accuracy": val_accuracy,
        "test_accuracy": _accuracy(model, inputs[test_idx], targets[test_idx]),
        "dataset_size": len(labels),
        "train_size": len(train_idx),
        "test_size": len(test_idx),
    }
    return model.eval(), metrics


def train_and_save(
    repository_root: str | os.PathLike[str],
    name: str = DEFAULT_MODEL_NAME,
    version: str = DEFAULT_MODEL_VERSION,
    settings: TrainingSettings | None = None,
    overwrite: bool = False,
) -> TrainingResult:
    """Trains and writes <root>/<name>/<version>; raises RuntimeError below min_test_accuracy."""
    settings = settings or TrainingSettings()
    repository = ModelRepository(repository_root)
    if not overwrite and repository.has_model(name, version):  # fail before minutes of training
        raise FileExistsError(f"{repository.root / name / version} exists; pass overwrite=True to replace it")
    started = time.perf_counter()
    model, metrics = train_model(settings)
    seconds = time.perf_counter() - started
    if metrics["test_accuracy"] < settings.min_test_accuracy:
        raise RuntimeError(
            f"test accuracy {metrics['test_accuracy']:.4f} is below {settings.min_test_accuracy}; "
            "model not saved"
        )
    config = ModelConfig(
        architecture=DEFAULT_ARCHITECTURE,
        labels=DEFAULT_LABELS,
        input_size=settings.input_size,
        channels=1,
        mean=DEFAULT_MEAN,
        std=DEFAULT_STD,
        batching=BatchingConfig(),
        training={
            **metrics,
            "seed": settings.seed,
            "dataset": "snaplearn_vision.worksheets",
            "settings": {k: v for k, v in dataclasses.asdict(settings).items() if k != "progress"},
            "seconds": round(seconds, 1),
            "torch": torch.__version__,
        },
    )
    path = repository.save(name, version, config, model, overwrite=overwrite)
    return TrainingResult(
        path,
        float(metrics["test_accuracy"]),
        float(metrics["val_accuracy"]),
        int(metrics["dataset_size"]),
        seconds,
    )


def ensure_default_model(
    repository_root: str | os.PathLike[str], settings: TrainingSettings | None = None
) -> Path:
    """The default model's directory, training it first only if the repository lacks it."""
    repository = ModelRepository(repository_root)
    if repository.has_model(DEFAULT_MODEL_NAME, DEFAULT_MODEL_VERSION):
        return repository.resolve(DEFAULT_MODEL_NAME, DEFAULT_MODEL_VERSION)[1]
    try:
        return train_and_save(repository_root, settings=settings or TrainingSettings(progress=False)).path
    except FileExistsError:  # another process trained it meanwhile; its copy is as good
        return repository.resolve(DEFAULT_MODEL_NAME, DEFAULT_MODEL_VERSION)[1]


def _default_threads() -> int:
    # A small network gains little from more threads than this and then fights its neighbours.
    return max(
        1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    )


def main(argv: list[str] | None = None) -> int:
    defaults = TrainingSettings()
    parser = argparse.ArgumentParser(
        prog="python -m snaplearn_vision.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--repository", default="var/models", help="model repository root")
    parser.add_argument("--name", default=DEFAULT_MODEL_NAME)
    parser.add_argument("--version", default=DEFAULT_MODEL_VERSION)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--n-per-class", type=int, default=defaults.n_per_class)
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--threads", type=int, default=_default_threads(), help="torch CPU threads")
    parser.add_argument("--min-test-accuracy", type=float, default=defaults.min_test_accuracy)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing version")
    parser.add_argument(
        "--if-missing", action="store_true", help="do nothing when the repository already has this version"
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bars (also off when stderr is not a terminal)"
    )
    args = parser.parse_args(argv)
    settings = dataclasses.replace(
        defaults,
        seed=args.seed,
        n_per_class=args.n_per_class,
        epochs=args.epochs,
        num_threads=args.threads,
        min_test_accuracy=args.min_test_accuracy,
        # Progress bars only on a terminal: in a log file each redraw is a line of noise.
        progress=not args.no_progress and sys.stderr.isatty(),
    )
    if args.if_missing and ModelRepository(args.repository).has_model(args.name, args.version):
        config = ModelRepository(args.repository).load_config(args.name, args.version)
        accuracy = config.training.get("test_accuracy")
        shown = f"{accuracy:.4f}" if isinstance(accuracy, float) else "unknown"
        print(f"model {args.name}/{args.version} already in {args.repository} (test accuracy {shown})")
        return 0
    print(f"training {args.name}/{args.version} into {args.repository} (seed {args.seed}); runs once")
    try:
        result = train_and_save(args.repository, args.name, args.version, settings, overwrite=args.overwrite)
    except (RuntimeError, FileExistsError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(
        f"test accuracy: {result.test_accuracy:.4f} ({result.dataset_size} images, "
        f"val {result.val_accuracy:.4f}) in {result.seconds:.1f} s"
    )
    print(result.path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
