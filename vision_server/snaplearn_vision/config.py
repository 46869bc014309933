"""The vision server's settings: one declaration, read from flags and SNAPLEARN_VISION_* variables.

Each field is a flag (--max-queue-size) and an environment variable
(SNAPLEARN_VISION_MAX_QUEUE_SIZE); a flag beats its variable, which beats the default declared
here (or, for what a model is, in snaplearn_vision.schema). The event bus settings nest
(snaplearn_common.eventbus.settings.BusSettings: --bus, SNAPLEARN_BUS, ...). Built by
`settings_from_args` in main(), or in code (`VisionSettings.from_env({}, port=0)` in tests).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, ClassVar

from pydantic import Field, field_validator

from snaplearn_common.eventbus.settings import BusSettings
from snaplearn_common.pseudonym_settings import PseudonymSettings
from snaplearn_common.security.settings import SecuritySettings
from snaplearn_common.settings import Cli, Settings, SettingsConfigDict, none_for
from snaplearn_vision.schema import (
    DEFAULT_MAX_IMAGE_BYTES,
    DEFAULT_MAX_QUEUE_SIZE,
    DEFAULT_MODEL_NAME,
    DEFAULT_MODEL_VERSION,
    DeviceChoice,
    Precision,
)

ENV_PREFIX = "SNAPLEARN_VISION_"
DEFAULT_PORT = 50051
DEFAULT_METRICS_PORT = 9101
# rpc_cap's assumptions: the largest batch a model's own config asks for, and the calls in
# flight besides classifications (health, metadata, refusals being written).
_CAP_BATCH_WHEN_MODEL_DECIDES = 64
_CAP_MARGIN = 32

_AtLeast1 = Annotated[int, Field(ge=1)]

_NETWORK = "network"
_MODEL = "model"
_BATCHING = "batching"
_OPERATIONS = "operations"
_EVENTS = BusSettings.cli_group  # beside the bus's own flags


def _seconds_or_never(value: object) -> object:
    """A flag's or variable's seconds where 0 (or nothing) means "never"."""
    if isinstance(value, str):
        seconds = float(value) if value.strip() else 0.0
        return seconds if seconds > 0 else None
    return value


def _count_or_default(value: object) -> object:
    """A flag's or variable's count where 0 (or nothing) means "grpc's default"."""
    if isinstance(value, str):
        count = int(value) if value.strip() else 0
        return count if count > 0 else None
    return value


class VisionSettings(Settings):
    """SnapLearn vision server: classifies worksheet photos over gRPC and publishes ImageClassified
    events."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX)
    cli_prog: ClassVar[str | None] = "snaplearn-vision"

    # -- network ------------------------------------------------------------------------------
    host: Annotated[str, Cli(group=_NETWORK), Field(description="interface to bind")] = "127.0.0.1"
    port: Annotated[int, Cli(group=_NETWORK), Field(ge=0, le=65535, description="gRPC port (0 = pick)")] = (
        DEFAULT_PORT
    )
    metrics_port: Annotated[
        int, Cli(group=_NETWORK), Field(ge=0, le=65535, description="Prometheus /metrics port (0 = pick)")
    ] = DEFAULT_METRICS_PORT
    ready_file: Annotated[
        Path | None,
        Cli(group=_NETWORK),
        none_for(""),
        Field(description="once serving, write {host, port, metrics_port, pid} as JSON here"),
    ] = None

    # -- model --------------------------------------------------------------------------------
    model_repository: Annotated[
        Path, Cli(group=_MODEL), Field(description="folder of <name>/<version>/ model directories")
    ] = Path("var/models")
    model_name: Annotated[str, Cli(group=_MODEL), Field(min_length=1, description="default model")] = (
        DEFAULT_MODEL_NAME
    )
    model_version: Annotated[
        str, Cli(group=_MODEL), Field(description="default model's version ('' = latest)")
    ] = DEFAULT_MODEL_VERSION
    device: Annotated[DeviceChoice, Cli(group=_MODEL), Field(description="where the model runs")] = "auto"
    torch_threads: Annotated[
        _AtLeast1 | None,
        Cli(group=_MODEL),
        none_for("", "none", "model"),
        Field(description="intra-op threads (unset: torch's default)"),
    ] = None
    precision: Annotated[Precision, Cli(group=_MODEL), Field(description="model precision (GPU only)")] = (
        "fp32"
    )
    channels_last: Annotated[
        bool, Cli(group=_MODEL), Field(description="NHWC memory format for the model and its inputs")
    ] = True
    compile_model: Annotated[
        bool,
        Cli(flag="--compile", group=_MODEL),
        Field(validation_alias=ENV_PREFIX + "COMPILE", description="torch.compile the model (GPU only)"),
    ] = False
    # The live repository (core/service.py): each loaded model's versions are read again this
    # often; new ones are loaded and swapped in, removed ones drained and unloaded.
    model_poll_interval_s: Annotated[
        Annotated[float, Field(gt=0, allow_inf_nan=False)] | None,
        Cli(flag="--model-poll-interval", group=_MODEL),
        Field(
            description="seconds between reads of the model repository for new or removed versions; "
            "0 = never (versions change only by RepositoryModelLoad/Unload or a restart)"
        ),
    ] = 5.0

    # -- batching -----------------------------------------------------------------------------
    # None keeps the model's own config (max_batch_size / max_queue_delay_ms in config.json).
    max_batch_size: Annotated[
        _AtLeast1 | None,
        Cli(group=_BATCHING),
        none_for("", "none", "model"),
        Field(description="override the model's max batch size"),
    ] = None
    max_queue_delay_ms: Annotated[
        Annotated[float, Field(ge=0, allow_inf_nan=False)] | None,
        Cli(group=_BATCHING),
        none_for("", "none", "model"),
        Field(description="override the model's max queue delay"),
    ] = None
    max_queue_size: Annotated[
        int,
        Cli(group=_BATCHING),
        Field(ge=1, description="requests waiting per model before RESOURCE_EXHAUSTED"),
    ] = DEFAULT_MAX_QUEUE_SIZE
    decode_threads: Annotated[
        int, Cli(group=_BATCHING), Field(ge=1, description="threads that decode and resize images")
    ] = 2
    # Decoders run this much "nicer" than the event loop and the model thread (see lower_priority).
    decode_niceness: Annotated[
        int,
        Cli(group=_BATCHING),
        Field(
            ge=0, le=19, description="decode threads run this much nicer than the event loop (0 = as nice)"
        ),
    ] = 5
    # How long a thread may hold the GIL while another waits for it (sys.setswitchinterval).
    gil_switch_interval_ms: Annotated[
        float,
        Cli(group=_BATCHING),
        Field(
            description="how long the event loop or a decode thread may hold the GIL while another "
            "thread waits for it (Python's own is 5)"
        ),
    ] = 1.0
    max_image_bytes: Annotated[
        int, Cli(group=_BATCHING), Field(ge=1, description="larger images are rejected with INVALID_ARGUMENT")
    ] = DEFAULT_MAX_IMAGE_BYTES
    # grpc's own cap on calls in flight: beyond it grpc answers RESOURCE_EXHAUSTED before any of
    # our code runs. None derives it from the queue limits (rpc_cap); 0 turns it off, the
    # default: our admission refuses with a message naming the queue, this is an operator's
    # backstop.
    max_concurrent_rpcs: Annotated[
        Annotated[int, Field(ge=0)] | None,
        Cli(group=_BATCHING),
        none_for("auto"),
        Field(
            description="grpc refuses calls beyond this many in flight (RESOURCE_EXHAUSTED, 'Concurrent "
            "RPC limit exceeded!') before our code runs; 'auto' = queue size + 2 batches + 32; 0 = no cap",
        ),
    ] = 0
    # Bound on grpc's backlog of calls not yet picked up (see start_grpc_server); None keeps
    # grpc's own.
    max_pending_calls: Annotated[
        Annotated[int, Field(ge=2)] | None,
        Cli(group=_BATCHING),
        Field(
            description="calls grpc may hold before Python picks them up; beyond, grpc sheds them at "
            "once (CANCELLED), from half of it with rising probability; 0 = grpc's default",
        ),
    ] = None

    # -- operations ---------------------------------------------------------------------------
    shutdown_grace_s: Annotated[
        float,
        Cli(flag="--shutdown-grace", group=_OPERATIONS),
        Field(ge=0, description="seconds in-flight calls may take to finish on SIGTERM"),
    ] = 10.0
    # Close client connections after this long so round-robin clients re-resolve DNS and
    # reach pods added by a scale-up (None: connections live until the client closes them).
    max_connection_age_s: Annotated[
        Annotated[float, Field(gt=0)] | None,
        Cli(flag="--max-connection-age", group=_OPERATIONS),
        Field(
            description="seconds before a client connection is closed (GOAWAY) so clients "
            "re-resolve; 0 = never"
        ),
    ] = None
    log_level: Annotated[str, Cli(group=_OPERATIONS), Field(description="logging level")] = "INFO"
    # Worker processes behind one port (snaplearn_vision.process.supervisor): each its own
    # interpreter, GIL, event loop and model copy; the kernel spreads connections over them.
    workers: Annotated[
        int,
        Cli(group=_OPERATIONS),
        Field(
            ge=1,
            description="server processes behind the one port, each with its own model copy (worth it "
            "for small models: one process is bound by its GIL; see docs/DECISIONS.md, D18)",
        ),
    ] = 1
    # Set by the supervisor in each worker it starts: bind with SO_REUSEPORT only once the model
    # is loaded, metrics on 127.0.0.1 (the supervisor serves the sum), no ready line on stdout.
    worker_index: Annotated[Annotated[int, Field(ge=0)] | None, Cli(hidden=True)] = None

    # -- events -------------------------------------------------------------------------------
    publish: Annotated[
        bool,
        Cli(group=_EVENTS),
        Field(
            description="publish an ImageClassified event per prediction (--no-publish: inference "
            "only, no event bus at all)"
        ),
    ] = True
    event_bus: BusSettings = Field(default_factory=BusSettings.from_env)
    # TLS, tokens, rate limit, reflection (--tls-cert, SNAPLEARN_TLS_CERT, ...; none: plaintext, open).
    security: SecuritySettings = Field(default_factory=SecuritySettings.from_env)
    # Pseudonymous user ids (SNAPLEARN_PSEUDONYM_KEY or --pseudonym-key-file; none: ids as sent, D54).
    pseudonym: PseudonymSettings = Field(default_factory=PseudonymSettings.from_env)
    # Where events wait, on disk, while the bus is unreachable (and across restarts); None
    # keeps them in memory only.
    spool_dir: Annotated[
        Path | None,
        Cli(group=_EVENTS),
        none_for(""),
        Field(description="events wait here while the event bus is unreachable ('' = in memory only)"),
    ] = Path("var/spool")

    @field_validator("max_connection_age_s", mode="before")
    @classmethod
    def _age_zero_is_never(cls, value: object) -> object:
        return _seconds_or_never(value)

    @field_validator("model_poll_interval_s", mode="before")
    @classmethod
    def _poll_zero_is_never(cls, value: object) -> object:
        return _seconds_or_never(value)

    @field_validator("max_pending_calls", mode="before")
    @classmethod
    def _pending_zero_is_default(cls, value: object) -> object:
        return _count_or_default(value)

    @field_validator("gil_switch_interval_ms")
    @classmethod
    def _switch_interval_in_range(cls, value: float) -> float:
        if not (math.isfinite(value) and 0.01 <= value <= 100):
            raise ValueError(f"gil_switch_interval_ms must be in 0.01..100, got {value}")
        return value

    @field_validator("log_level")
    @classmethod
    def _log_level_upper(cls, value: str) -> str:
        return value.upper()

    @property
    def bus(self) -> BusSettings | None:
        """The event bus to publish to; None with --no-publish (no events, no bus at all)."""
        return self.event_bus if self.publish else None

    def rpc_cap(self) -> int | None:
        """The grpc-level cap on calls in flight, or None for no cap.

        Derived, it sits above what our own admission lets in (the queue, which counts the
        images decoding, plus up to two batches computing or being assembled, at the largest
        batch we allow) with room for health and metadata calls, so that our refusal, which
        names the queue and its limits, stays the one clients normally see.
        """
        if self.max_concurrent_rpcs == 0:
            return None
        if self.max_concurrent_rpcs is not None:
            return self.max_concurrent_rpcs
        batch = self.max_batch_size or _CAP_BATCH_WHEN_MODEL_DECIDES
        return self.max_queue_size + 2 * batch + _CAP_MARGIN


def settings_from_args(argv: Sequence[str] | None = None) -> VisionSettings:
    """Flags (sys.argv[1:] when None), then SNAPLEARN_VISION_* and the bus's variables, then the
    defaults; a bad value exits 2 with the usage and a message naming its flag and variable."""
    return VisionSettings.from_argv(argv)
