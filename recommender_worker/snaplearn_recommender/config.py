"""RecommenderSettings: the recommender process's one settings declaration.

Each field is a command-line flag and a SNAPLEARN_RECOMMENDER_<NAME> environment variable (a
flag beats its variable, which beats the default; see snaplearn_common.settings); the event
bus's settings nest as BusSettings with their own flags and variables. Fields whose flag or
variable is older than this declaration keep those names (`Cli(flag=...)`, validation_alias).
The model's and the worker's defaults are theirs (ModelParams, WorkerSettings), read from there.
"""

from __future__ import annotations

import logging
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, ClassVar, Literal, Self

from pydantic import AfterValidator, BeforeValidator, Field, model_validator

from snaplearn_common.eventbus.settings import BusSettings
from snaplearn_common.pseudonym_settings import PseudonymSettings
from snaplearn_common.security.settings import SecuritySettings
from snaplearn_common.settings import Cli, Settings, SettingsConfigDict, none_for
from snaplearn_recommender.catalog import (
    FEATURE_FLAG,
    ITEM_FLAG,
    FeatureSpec,
    checked_feature_flags,
    checked_item_flags,
    parse_feature_flags,
    parse_item_flags,
)
from snaplearn_recommender.model import Loss, ModelParams
from snaplearn_recommender.snapshot_store import DEFAULT_RETAIN, open_storage
from snaplearn_recommender.worker import WorkerSettings

ENV_PREFIX = "SNAPLEARN_RECOMMENDER_"
# standalone: consume, train and serve (one process). trainer: the same, and publish snapshots.
# query: no consumer, no training, no checkpoints; serve the newest published snapshot.
Role = Literal["standalone", "trainer", "query"]
ROLES: tuple[Role, ...] = typing.get_args(Role)

_MODEL = ModelParams()
_WORKER = WorkerSettings()
_SCALE_OUT = "scale-out (a trainer publishes snapshots, replicas serve them)"
_UNSET_IF_EMPTY = none_for("")


def _env(name: str) -> str:
    """The variable of a field whose name differs from its variable's (it predates the field)."""
    return ENV_PREFIX + name


def _known_role(value: object) -> object:
    if isinstance(value, str) and value not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    return value


def _supported_store(location: str | None) -> str | None:
    if location is not None:
        open_storage(location)  # no I/O: rejects what is not supported (object stores)
    return location


def _log_level(value: object) -> object:
    if not isinstance(value, str):
        return value
    level = value.strip().upper()
    if level not in logging.getLevelNamesMapping():
        raise ValueError("log level must be DEBUG, INFO, WARNING, ERROR or CRITICAL")
    return level


def _zero_is_never(value: object) -> object:
    """0 (the flag's and the variable's word for "never") is None."""
    if isinstance(value, str):
        try:
            return None if float(value) == 0 else value
        except ValueError:
            return value
    return value


def _positive_age(value: float | None) -> float | None:
    if value is not None and not value > 0:
        raise ValueError("max_connection_age_s must be > 0 (0 on the command line: never)")
    return value


def parse_band(value: str) -> tuple[float, float]:
    """ "LOW HIGH" (or "LOW,HIGH") as two numbers with 0 <= LOW <= HIGH <= 1."""
    parts = value.replace(",", " ").split()
    try:
        low, high = (float(part) for part in parts)
    except ValueError:
        raise ValueError("practise band must be two numbers 'LOW HIGH'") from None
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError("practise band must satisfy 0 <= LOW <= HIGH <= 1")
    return low, high


def _band(value: str) -> str:
    low, high = parse_band(value)
    return f"{low:g} {high:g}"


class RecommenderSettings(Settings):
    """Learns a LightFM hybrid model from ImageClassified events; serves Recommend over gRPC."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX)
    cli_prog: ClassVar[str | None] = "snaplearn-recommender"

    host: Annotated[str, Field(description="address to listen on")] = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535, description="gRPC port (0 picks one)")] = 50052
    metrics_port: Annotated[int, Field(ge=0, le=65535, description="/metrics port (0 picks one)")] = 9102
    bus: BusSettings = Field(default_factory=BusSettings.from_env)
    # TLS, tokens, rate limit, reflection (--tls-cert, SNAPLEARN_TLS_CERT, ...; none: plaintext, open).
    security: SecuritySettings = Field(default_factory=SecuritySettings.from_env)
    # Pseudonymous user ids (SNAPLEARN_PSEUDONYM_KEY or --pseudonym-key-file; none: ids as sent, D54).
    pseudonym: PseudonymSettings = Field(default_factory=PseudonymSettings.from_env)
    catalog_path: Annotated[Path | None, Cli(flag="--catalog", metavar="PATH"), _UNSET_IF_EMPTY] = Field(
        default=None,
        validation_alias=_env("CATALOG"),
        description=".csv or .jsonl (unset: the sample catalog)",
    )
    catalog_features_path: Annotated[
        Path | None, Cli(flag="--catalog-features", metavar="PATH"), _UNSET_IF_EMPTY
    ] = Field(
        default=None,
        validation_alias=_env("CATALOG_FEATURES"),
        description="the catalog's feature declaration, .toml or .json (unset: <catalog stem>.features.toml "
        "or .json beside the catalog, else its grade/format/difficulty columns)",
    )
    catalog_feature: Annotated[
        list[str],
        Cli(flag=FEATURE_FLAG, metavar="NAME[@COLUMN][=KIND[:ARG]]", repeatable=True),
        AfterValidator(checked_feature_flags),
    ] = Field(
        default_factory=list,
        description="a catalog feature, merged into the declaration (a flag's feature replaces the "
        "declared one of its name): KIND categorical (default), multi[:SEPARATOR] or "
        "numeric[:EDGE,EDGE,...], e.g. topic=categorical, tags=multi:|, minutes=numeric:0,10,20",
    )
    catalog_item: Annotated[
        list[str],
        Cli(flag=ITEM_FLAG, metavar="KEY=VALUE", repeatable=True),
        AfterValidator(checked_item_flags),
    ] = Field(
        default_factory=list,
        description="the item's own columns, replacing the declaration's [item] keys: id, title, concepts, "
        "concept_separator, prerequisites, prerequisite_separator, e.g. id='Exercise ID'",
    )
    label_map_path: Annotated[Path | None, Cli(flag="--label-map", metavar="PATH"), _UNSET_IF_EMPTY] = Field(
        default=None,
        validation_alias=_env("LABEL_MAP"),
        description="JSON {label: [concepts]} (unset: vision labels are concept names)",
    )
    checkpoint_dir: Annotated[Path | None, Cli(metavar="DIR"), _UNSET_IF_EMPTY] = Field(
        default=Path("var/recommender"), description="where model checkpoints live ('' disables checkpoints)"
    )
    checkpoint_interval_s: Annotated[float, Cli(flag="--checkpoint-interval", metavar="S")] = Field(
        default=_WORKER.checkpoint_interval_s,
        gt=0,
        validation_alias=_env("CHECKPOINT_INTERVAL"),
        description="seconds between checkpoints",
    )
    consumer_group: Annotated[str, Field(min_length=1, description="event bus consumer group")] = (
        _WORKER.group_id
    )
    consumer_instance_id: Annotated[
        str,
        Field(
            pattern=r"^[A-Za-z0-9._-]{0,249}$",
            description="static group membership id: a restart under it takes the partitions back "
            "without waiting for the session timeout; one process per id ('' = dynamic membership)",
        ),
    ] = _WORKER.instance_id
    batch_max_events: Annotated[int, Field(ge=1, description="events per micro-batch, at most")] = (
        _WORKER.batch_max_events
    )
    batch_max_wait_ms: Annotated[
        float, Field(ge=0, description="how long a micro-batch waits for more events after its first")
    ] = _WORKER.batch_max_wait_s * 1000
    no_components: Annotated[int, Field(ge=1, description="LightFM embedding size")] = _MODEL.no_components
    loss: Annotated[Loss, Field(description="LightFM loss")] = _MODEL.loss
    learning_rate: Annotated[float, Field(gt=0, description="LightFM learning rate")] = _MODEL.learning_rate
    epochs_per_batch: Annotated[int, Field(ge=1, description="LightFM epochs per micro-batch")] = (
        _MODEL.epochs_per_batch
    )
    seed: Annotated[int, Field(description="seed of the model's initialisation and warm start")] = _MODEL.seed
    skip_window_s: Annotated[float, Cli(flag="--skip-window", metavar="S")] = Field(
        default=_MODEL.skip_window_s,
        ge=0,
        validation_alias=_env("SKIP_WINDOW"),
        description="seconds (of event time) a skipped item stays out of that student's recommendations",
    )
    practise_band: Annotated[str, AfterValidator(_band), Cli(metavar="'LOW HIGH'")] = Field(
        default=f"{_MODEL.practise_low:g} {_MODEL.practise_high:g}",
        description="for students with attempts, prefer items whose predicted success lies in this band",
    )
    mastery_threshold: Annotated[float, Cli(metavar="P")] = Field(
        default=_MODEL.mastery_threshold,
        gt=0,
        lt=1,
        description="mastery (predicted success on a concept) at which a prerequisite counts as mastered",
    )
    practise_readiness_weight: Annotated[float, Cli(metavar="W")] = Field(
        default=_MODEL.readiness_weight,
        allow_inf_nan=False,
        description="practise next: weight of the share of an item's prerequisites mastered against the "
        "standardised ranking score",
    )
    practise_band_weight: Annotated[float, Cli(metavar="W")] = Field(
        default=_MODEL.band_weight,
        allow_inf_nan=False,
        description="practise next: weight of predicted success in the band against the ranking score",
    )
    practise_next_step_weight: Annotated[float, Cli(metavar="W")] = Field(
        default=_MODEL.next_step_weight,
        allow_inf_nan=False,
        description="practise next: weight of an item having the concept practised last as a prerequisite",
    )
    practise_extra: Annotated[int, Cli(metavar="N")] = Field(
        default=_MODEL.practise_extra,
        ge=0,
        description="practise next reorders the ranking's best k + N for a student with attempts",
    )
    mastery_online_rate: Annotated[float, Cli(metavar="R")] = Field(
        default=_MODEL.mastery_online_rate,
        ge=0,
        lt=1,
        description="learning rate of the mastery model's weights, one step per attempt (0: fixed weights)",
    )
    # Where RecordFeedback's unconfirmed events wait on disk across a bus outage and a restart.
    feedback_spool_dir: Annotated[Path | None, Cli(metavar="DIR"), _UNSET_IF_EMPTY] = Field(
        default=None,
        description="disk spool for unconfirmed feedback events (one process's own directory; "
        "unset: <checkpoint-dir>/feedback-spool, or memory only on a query replica)",
    )
    ready_file: Annotated[Path | None, Cli(metavar="PATH"), _UNSET_IF_EMPTY] = Field(
        default=None, description="JSON of bound ports, written once ready"
    )
    log_level: Annotated[str, BeforeValidator(_log_level), Field(description="logging level")] = "INFO"
    role: Annotated[Role, BeforeValidator(_known_role), Cli(group=_SCALE_OUT)] = Field(
        default="standalone",
        description="standalone: consume, train, serve; trainer: also publish snapshots; "
        "query: serve the newest published snapshot (no consumer, no training, no checkpoints)",
    )
    # Required by the trainer and query roles; a str, not a Path: a URL scheme must survive.
    snapshot_dir: Annotated[
        str | None, Cli(group=_SCALE_OUT, metavar="DIR"), _UNSET_IF_EMPTY, AfterValidator(_supported_store)
    ] = Field(
        default=None,
        description="snapshot store shared by the trainer and the query replicas (a directory on a "
        "shared volume)",
    )
    publish_interval_s: Annotated[float, Cli(flag="--publish-interval", group=_SCALE_OUT, metavar="S")] = (
        Field(
            default=5.0,
            gt=0,
            validation_alias=_env("PUBLISH_INTERVAL"),
            description="trainer: seconds between publishes (only when the model changed)",
        )
    )
    poll_interval_s: Annotated[float, Cli(flag="--poll-interval", group=_SCALE_OUT, metavar="S")] = Field(
        default=2.0,
        gt=0,
        validation_alias=_env("POLL_INTERVAL"),
        description="query: seconds between looks for a newer snapshot",
    )
    snapshot_retain: Annotated[int, Cli(group=_SCALE_OUT, metavar="N")] = Field(
        default=DEFAULT_RETAIN, ge=1, description="trainer: snapshot versions kept in the store"
    )
    # Closing client connections now and then makes round-robin clients re-resolve DNS and reach
    # replicas added by a scale-up.
    max_connection_age_s: Annotated[
        float | None,
        BeforeValidator(_zero_is_never),
        AfterValidator(_positive_age),
        Cli(flag="--max-connection-age", metavar="S"),
    ] = Field(
        default=None,
        validation_alias=_env("MAX_CONNECTION_AGE"),
        description="seconds before a client connection is closed (GOAWAY) so clients re-resolve; 0: never",
    )

    @model_validator(mode="after")
    def _role_has_its_store(self) -> Self:
        if self.role != "standalone" and self.snapshot_dir is None:
            where = f"{self.flag_of('snapshot_dir')} or {self.env_of('snapshot_dir')}"
            raise ValueError(f"role {self.role} needs a snapshot directory ({where})")
        return self

    @model_validator(mode="after")
    def _features_need_a_catalog(self) -> Self:
        if (self.catalog_feature or self.catalog_item) and self.catalog_path is None:
            flag = FEATURE_FLAG if self.catalog_feature else ITEM_FLAG
            raise ValueError(f"{flag} declares columns of a catalog file: give --catalog too")
        return self

    def catalog_item_columns(self) -> dict[str, str]:
        """The item's columns given by --catalog-item (checked when the settings were built)."""
        return parse_item_flags(self.catalog_item)

    def catalog_feature_specs(self) -> tuple[FeatureSpec, ...]:
        """The features declared by --catalog-feature (checked when the settings were built)."""
        return parse_feature_flags(self.catalog_feature)

    def model_params(self) -> ModelParams:
        return ModelParams(
            no_components=self.no_components,
            loss=self.loss,
            learning_rate=self.learning_rate,
            epochs_per_batch=self.epochs_per_batch,
            seed=self.seed,
            skip_window_s=self.skip_window_s,
            practise_low=parse_band(self.practise_band)[0],
            practise_high=parse_band(self.practise_band)[1],
            mastery_threshold=self.mastery_threshold,
            readiness_weight=self.practise_readiness_weight,
            band_weight=self.practise_band_weight,
            practise_extra=self.practise_extra,
            mastery_online_rate=self.mastery_online_rate,
            next_step_weight=self.practise_next_step_weight,
        )

    def worker_settings(self) -> WorkerSettings:
        return WorkerSettings(
            topic=self.bus.topic,
            group_id=self.consumer_group,
            instance_id=self.consumer_instance_id,
            topic_partitions=self.bus.partitions,
            batch_max_events=self.batch_max_events,
            batch_max_wait_s=self.batch_max_wait_ms / 1000,
            checkpoint_interval_s=self.checkpoint_interval_s,
        )


def settings_from_args(argv: Sequence[str] | None = None) -> RecommenderSettings:
    """Flags (sys.argv[1:] when None), then the environment, then the defaults; exits 2 when invalid."""
    return RecommenderSettings.from_argv(argv)
