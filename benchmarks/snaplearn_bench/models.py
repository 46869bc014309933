"""The models the benchmarks serve: the default model as `make up` trains it, and torchvision
architectures with random weights (what a benchmark of serving needs: the same compute)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from snaplearn_bench.paths import BENCH_MODELS_DIR, MODELS_DIR, PY

DEFAULT_MODEL = "worksheet-topics"

_RANDOM_WEIGHTS = """
import torch
from snaplearn_common.topics import DEFAULT_TOPICS
from snaplearn_vision.runtime.architectures import build_model
from snaplearn_vision.runtime.model_repository import ModelRepository
from snaplearn_vision.schema import BatchingConfig, ModelConfig
repository = ModelRepository({root!r})
if not repository.has_model({name!r}):
    torch.manual_seed(0)
    config = ModelConfig(architecture={name!r}, labels=tuple(DEFAULT_TOPICS), input_size=(224, 224),
        channels=3, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
        batching=BatchingConfig(max_batch_size=32, max_queue_delay_ms=5.0), training={{"weights": "random"}})
    repository.save({name!r}, "1", config, build_model({name!r}, len(DEFAULT_TOPICS), 3, None))
"""


def ensure_default_model(models: Path = MODELS_DIR) -> Path:
    """The default model in `models`, trained there if missing: the model `make up` trains
    (seeded), so the benchmarks measure what users run. Its progress bar only on a terminal."""
    progress = [] if sys.stderr.isatty() else ["--no-progress"]
    train = [PY, "-m", "snaplearn_vision.train", "--repository", str(models), "--if-missing", *progress]
    subprocess.run(train, check=True)
    return models


def prepare_models(names: list[str], default_root: Path = MODELS_DIR) -> dict[str, Path]:
    """model name -> repository root; each model made there if missing (in a process of its own:
    this one need not import torch). The default model lives in `default_root`."""
    roots = {}
    for name in names:
        if name == DEFAULT_MODEL:
            roots[name] = ensure_default_model(default_root)
            continue
        subprocess.run([PY, "-c", _RANDOM_WEIGHTS.format(root=str(BENCH_MODELS_DIR), name=name)], check=True)
        roots[name] = BENCH_MODELS_DIR
    return roots


def configured_max_batch_size(root: Path, model: str) -> int:
    """The max batch size in the model's config.json (version 1), what a deployment uses."""
    from snaplearn_vision.runtime.model_repository import ModelRepository

    return int(ModelRepository(root).load_config(model, "1").batching.max_batch_size)


def load_classifier(root: Path, model: str) -> Any:
    """The engine's classifier of `model` (latest version) on the CPU, warmed up: what the raw
    bound and the peers serve with, the same decode and forward code as our server."""
    from snaplearn_vision.runtime.model_repository import ModelRepository

    classifier = ModelRepository(root).load(model, device="cpu")
    classifier.warm_up()
    return classifier


def parse_models(text: str) -> list[str]:
    """--models: "a,b" -> ["a", "b"]."""
    return [name.strip() for name in text.split(",") if name.strip()]
