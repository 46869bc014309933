"""Model checkpoints: the whole model plus the stream offsets it has applied, in one file.

Model and offsets are written together (one pickle, replaced atomically), so a
restored model never claims events it has not applied, nor misses ones it has. The file
is trusted local state written by this process (pickle), never input from clients.
"""

from __future__ import annotations

import logging
import os
import pickle
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from snaplearn_common.eventbus.base import TopicPartition
from snaplearn_common.files import atomic_write
from snaplearn_recommender.model import RecommenderModel

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
CHECKPOINT_FILE = "recommender.ckpt"


@dataclass(frozen=True, slots=True)
class Checkpoint:
    model: RecommenderModel
    offsets: Mapping[TopicPartition, int]  # next offset to read, per partition
    created_at: float


class Checkpointer:
    """Saves and restores the latest checkpoint in one directory."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.path = self.directory / CHECKPOINT_FILE

    def save(self, model: RecommenderModel, offsets: Mapping[TopicPartition, int]) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        state = {
            "format": CHECKPOINT_FORMAT,
            "model": model,
            "offsets": {(tp.topic, tp.partition): offset for tp, offset in offsets.items()},
            "created_at": time.time(),
        }
        atomic_write(self.path, pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL))
        return self.path

    def load(self) -> Checkpoint | None:
        """The saved checkpoint, or None when there is none (a corrupt file is an error)."""
        if not self.path.exists():
            return None
        with self.path.open("rb") as source:
            state = pickle.load(source)
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{self.path}: unsupported checkpoint format; move it away to start fresh")
        model = state["model"]
        if not isinstance(model, RecommenderModel):
            raise ValueError(f"{self.path}: checkpoint does not hold a RecommenderModel")
        offsets = {
            TopicPartition(topic, partition): int(o) for (topic, partition), o in state["offsets"].items()
        }
        return Checkpoint(model=model, offsets=offsets, created_at=float(state["created_at"]))
