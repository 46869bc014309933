"""RecommenderSettings: built once in main() from argparse, with SNAPLEARN_RECOMMENDER_* env fallbacks."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from snaplearn_common.eventbus.factory import (
    DEFAULT_PARTITIONS,
    BusSettings,
    add_bus_arguments,
    bus_settings_from_args,
)
from snaplearn_recommender.model import ModelParams
from snaplearn_recommender.worker import CONSUMER_GROUP, WorkerSettings

ENV_PREFIX = "SNAPLEARN_RECOMMENDER_"


@dataclass(frozen=True, slots=True)
class RecommenderSettings:
    host: str = "127.0.0.1"
    port: int = 50052
    metrics_port: int = 9102
    bus: BusSettings | None = None  # None: the caller hands the app an open bus (tests)
    catalog_path: Path | None = None  # None: the generated sample catalog
    label_map_path: Path | None = None  # None: vision labels are concept names
    checkpoint_dir: Path | None = Path("var/recommender")  # None: no checkpoints
    checkpoint_interval_s: float = 30.0
    consumer_group: str = CONSUMER_GROUP
    batch_max_events: int = 256
    batch_max_wait_ms: float = 50.0
    no_components: int = 32
    loss: str = "warp"
    learning_rate: float = 0.05
    epochs_per_batch: int = 3
    seed: int = 0
    ready_file: Path | None = None
    log_level: str = "INFO"

    def model_params(self) -> ModelParams:
        return ModelParams(
            no_components=self.no_components,
            loss=self.loss,
            learning_rate=self.learning_rate,
            epochs_per_batch=self.epochs_per_batch,
            seed=self.seed,
        )

    def worker_settings(self) -> WorkerSettings:
        defaults = WorkerSettings()
        return WorkerSettings(
            topic=self.bus.topic if self.bus else defaults.topic,
            group_id=self.consumer_group,
            batch_max_events=self.batch_max_events,
            batch_max_wait_s=self.batch_max_wait_ms / 1000,
            checkpoint_interval_s=self.checkpoint_interval_s,
            topic_partitions=self.bus.partitions if self.bus else DEFAULT_PARTITIONS,
        )


def _env(name: str, default: str | None) -> str | None:
    return os.environ.get(ENV_PREFIX + name, default)


def _optional_path(value: str | None) -> Path | None:
    return Path(value) if value else None


def build_parser() -> argparse.ArgumentParser:
    d = RecommenderSettings()
    parser = argparse.ArgumentParser(
        prog="snaplearn-recommender",
        description="Learns a LightFM hybrid model from ImageClassified events; serves Recommend over gRPC.",
        epilog=f"Options fall back to the environment variable {ENV_PREFIX}<OPTION>, e.g. {ENV_PREFIX}PORT.",
    )
    parser.add_argument("--host", default=_env("HOST", d.host))
    parser.add_argument(
        "--port", type=int, default=int(_env("PORT", str(d.port)) or d.port), help="0 picks one"
    )
    parser.add_argument(
        "--metrics-port", type=int, default=int(_env("METRICS_PORT", str(d.metrics_port)) or 0)
    )
    parser.add_argument(
        "--catalog", default=_env("CATALOG", None), help=".csv or .jsonl (default: sample catalog)"
    )
    parser.add_argument("--label-map", default=_env("LABEL_MAP", None), help="JSON {label: [concepts]}")
    parser.add_argument(
        "--checkpoint-dir",
        default=_env("CHECKPOINT_DIR", str(d.checkpoint_dir)),
        help="where model checkpoints live ('' disables checkpoints)",
    )
    parser.add_argument(
        "--checkpoint-interval",
        type=float,
        default=float(_env("CHECKPOINT_INTERVAL", "30") or 30),
        help="seconds",
    )
    parser.add_argument(
        "--consumer-group", default=_env("CONSUMER_GROUP", d.consumer_group), help="event bus consumer group"
    )
    parser.add_argument("--batch-max-events", type=int, default=int(_env("BATCH_MAX_EVENTS", "256") or 256))
    parser.add_argument(
        "--batch-max-wait-ms", type=float, default=float(_env("BATCH_MAX_WAIT_MS", "50") or 50)
    )
    parser.add_argument("--no-components", type=int, default=int(_env("NO_COMPONENTS", "32") or 32))
    parser.add_argument("--loss", choices=("warp", "bpr", "logistic"), default=_env("LOSS", d.loss))
    parser.add_argument("--learning-rate", type=float, default=float(_env("LEARNING_RATE", "0.05") or 0.05))
    parser.add_argument("--epochs-per-batch", type=int, default=int(_env("EPOCHS_PER_BATCH", "3") or 3))
    parser.add_argument("--seed", type=int, default=int(_env("SEED", "0") or 0))
    parser.add_argument(
        "--ready-file", default=_env("READY_FILE", None), help="JSON of bound ports, once ready"
    )
    parser.add_argument("--log-level", default=_env("LOG_LEVEL", d.log_level))
    add_bus_arguments(parser)
    return parser


def settings_from_args(argv: Sequence[str] | None = None) -> RecommenderSettings:
    args = build_parser().parse_args(argv)
    return RecommenderSettings(
        host=args.host,
        port=args.port,
        metrics_port=args.metrics_port,
        bus=bus_settings_from_args(args),
        catalog_path=_optional_path(args.catalog),
        label_map_path=_optional_path(args.label_map),
        checkpoint_dir=_optional_path(args.checkpoint_dir),
        checkpoint_interval_s=args.checkpoint_interval,
        consumer_group=args.consumer_group,
        batch_max_events=args.batch_max_events,
        batch_max_wait_ms=args.batch_max_wait_ms,
        no_components=args.no_components,
        loss=args.loss,
        learning_rate=args.learning_rate,
        epochs_per_batch=args.epochs_per_batch,
        seed=args.seed,
        ready_file=_optional_path(args.ready_file),
        log_level=str(args.log_level).upper(),
    )
