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
from snaplearn_recommender.snapshot_store import open_storage
from snaplearn_recommender.worker import CONSUMER_GROUP, WorkerSettings

ENV_PREFIX = "SNAPLEARN_RECOMMENDER_"
# standalone: consume, train and serve (one process). trainer: the same, and publish snapshots.
# query: no consumer, no training, no checkpoints; serve the newest published snapshot.
ROLES = ("standalone", "trainer", "query")


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
    skip_window_s: float = 24 * 3600.0  # a skipped item stays hidden from that student this long
    # Where RecordFeedback's unconfirmed events wait on disk across a bus outage and a restart.
    # None: <checkpoint_dir>/feedback-spool on a trainer/standalone; memory only on a query replica.
    feedback_spool_dir: Path | None = None
    ready_file: Path | None = None
    log_level: str = "INFO"
    role: str = "standalone"
    # Required by the trainer and query roles; a str, not a Path: a URL scheme must survive.
    snapshot_dir: str | None = None
    publish_interval_s: float = 5.0  # trainer: publish at most this often, when the model changed
    poll_interval_s: float = 2.0  # query: how often to look for a newer snapshot
    snapshot_retain: int = 5  # trainer: versions kept in the store
    # Close client connections after this long so round-robin clients re-resolve DNS and
    # reach replicas added by a scale-up (None: never).
    max_connection_age_s: float | None = None

    def __post_init__(self) -> None:
        if self.max_connection_age_s is not None and not self.max_connection_age_s > 0:
            raise ValueError(f"max_connection_age_s must be > 0; got {self.max_connection_age_s}")
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}; got {self.role!r}")
        if self.role != "standalone" and self.snapshot_dir is None:
            raise ValueError(f"role {self.role} needs a snapshot directory (--snapshot-dir)")
        if self.snapshot_dir is not None:
            open_storage(self.snapshot_dir)  # no I/O: rejects what is not supported (object stores)

    def model_params(self) -> ModelParams:
        return ModelParams(
            no_components=self.no_components,
            loss=self.loss,
            learning_rate=self.learning_rate,
            epochs_per_batch=self.epochs_per_batch,
            seed=self.seed,
            skip_window_s=self.skip_window_s,
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
        "--skip-window",
        type=float,
        default=float(_env("SKIP_WINDOW", str(d.skip_window_s)) or d.skip_window_s),
        help="seconds (of event time) a skipped item stays out of that student's recommendations",
    )
    parser.add_argument(
        "--feedback-spool-dir",
        default=_env("FEEDBACK_SPOOL_DIR", None),
        help="disk spool for unconfirmed feedback events (one process's own directory; "
        "default <checkpoint-dir>/feedback-spool, or memory only on a query replica)",
    )
    parser.add_argument(
        "--ready-file", default=_env("READY_FILE", None), help="JSON of bound ports, once ready"
    )
    parser.add_argument("--log-level", default=_env("LOG_LEVEL", d.log_level))
    scale_out = parser.add_argument_group("scale-out (a trainer publishes snapshots, replicas serve them)")
    scale_out.add_argument(
        "--role",
        choices=ROLES,
        default=_env("ROLE", d.role),
        help="standalone (default): consume, train, serve; trainer: also publish snapshots; "
        "query: serve the newest published snapshot (no consumer, no training, no checkpoints)",
    )
    scale_out.add_argument(
        "--snapshot-dir",
        default=_env("SNAPSHOT_DIR", None),
        help="snapshot store shared by the trainer and the query replicas (a directory; shared volume)",
    )
    scale_out.add_argument(
        "--publish-interval",
        type=float,
        default=float(_env("PUBLISH_INTERVAL", str(d.publish_interval_s)) or d.publish_interval_s),
        help="trainer: seconds between publishes (only when the model changed)",
    )
    scale_out.add_argument(
        "--poll-interval",
        type=float,
        default=float(_env("POLL_INTERVAL", str(d.poll_interval_s)) or d.poll_interval_s),
        help="query: seconds between looks for a newer snapshot",
    )
    scale_out.add_argument(
        "--snapshot-retain",
        type=int,
        default=int(_env("SNAPSHOT_RETAIN", str(d.snapshot_retain)) or d.snapshot_retain),
        help="trainer: snapshot versions kept in the store",
    )
    parser.add_argument(
        "--max-connection-age",
        type=float,
        default=float(_env("MAX_CONNECTION_AGE", "0") or 0),
        help="seconds before a client connection is closed (GOAWAY) so clients re-resolve; 0 = never",
    )
    add_bus_arguments(parser)
    return parser


def settings_from_args(argv: Sequence[str] | None = None) -> RecommenderSettings:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _settings(args)
    except ValueError as error:
        parser.error(str(error))


def _settings(args: argparse.Namespace) -> RecommenderSettings:
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
        skip_window_s=args.skip_window,
        feedback_spool_dir=_optional_path(args.feedback_spool_dir),
        ready_file=_optional_path(args.ready_file),
        log_level=str(args.log_level).upper(),
        role=args.role,
        snapshot_dir=args.snapshot_dir or None,
        publish_interval_s=args.publish_interval,
        poll_interval_s=args.poll_interval,
        snapshot_retain=args.snapshot_retain,
        max_connection_age_s=args.max_connection_age if args.max_connection_age > 0 else None,
    )
