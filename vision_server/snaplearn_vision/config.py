"""The vision server's settings: one typed, frozen object built from flags with env-var fallbacks.

Precedence: command-line flag, then environment variable (SNAPLEARN_VISION_*), then default.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from snaplearn_common.errors import InvalidInput
from snaplearn_common.eventbus.factory import BusSettings, add_bus_arguments, bus_settings_from_args
from snaplearn_vision.service import (
    DECODERS,
    DEFAULT_DECODE_NICENESS,
    DEFAULT_DECODE_THREADS,
    DEFAULT_DECODER,
    DEFAULT_MAX_QUEUE_SIZE,
)

ENV_PREFIX = "SNAPLEARN_VISION_"
DEFAULT_PORT = 50051
DEFAULT_METRICS_PORT = 9101
DEFAULT_MODEL_REPOSITORY = Path("var/models")
DEFAULT_MAX_IMAGE_BYTES = 10 * 1024 * 1024
DEFAULT_GIL_SWITCH_INTERVAL_MS = 1.0
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "fp16", "bf16")  # = snaplearn_vision.engine.PRECISIONS (engine imports torch)
# The default model's identity. snaplearn_vision.train defines the same constants, but importing
# it pulls in torch, which `--help` should not pay for; a test asserts they agree.
DEFAULT_MODEL_NAME = "worksheet-topics"
DEFAULT_MODEL_VERSION = "1"
# rpc_cap's assumptions: the largest batch a model's own config asks for, and the calls in
# flight besides classifications (health, metadata, refusals being written).
_CAP_BATCH_WHEN_MODEL_DECIDES = 64
_CAP_MARGIN = 32


@dataclass(frozen=True)
class VisionSettings:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT  # 0 picks a free port
    metrics_port: int = DEFAULT_METRICS_PORT  # 0 picks a free port
    model_repository: Path = DEFAULT_MODEL_REPOSITORY
    model_name: str = DEFAULT_MODEL_NAME
    model_version: str = DEFAULT_MODEL_VERSION  # "" = the latest version in the repository
    # Batching: None keeps the model's own config (max_batch_size / max_queue_delay_ms).
    max_batch_size: int | None = None
    max_queue_delay_ms: float | None = None
    max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE
    decode_threads: int = DEFAULT_DECODE_THREADS  # decode threads, or processes (decoder below)
    # How much lower the decoders' scheduling priority is than the event loop's.
    decode_niceness: int = DEFAULT_DECODE_NICENESS
    decoder: str = DEFAULT_DECODER  # "threads" of the server process, or "processes" of their own
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    # How long a thread may hold the GIL while another waits for it (sys.setswitchinterval).
    gil_switch_interval_ms: float = DEFAULT_GIL_SWITCH_INTERVAL_MS
    device: str = "auto"
    torch_threads: int | None = None  # None = torch's default
    # How the model runs (snaplearn_vision.engine.InferenceSettings; the CPU ignores the GPU-only ones).
    precision: str = "fp32"
    channels_last: bool = True
    compile_model: bool = False
    ready_file: Path | None = None
    shutdown_grace_s: float = 10.0
    # Close client connections after this long so round-robin clients re-resolve DNS and
    # reach pods added by a scale-up (None: connections live until the client closes them).
    max_connection_age_s: float | None = None
    # grpc's own cap on calls in flight: beyond it grpc answers RESOURCE_EXHAUSTED before any
    # of our code runs. None derives it from the queue limits (rpc_cap); 0 turns it off.
    # Off by default: at 3x overload it (almost) never fired and changed nothing measurable
    # (docs/benchmarks/vision.md, "Fast refusal experiment"); it is an operator's backstop.
    max_concurrent_rpcs: int | None = 0
    # Bound on grpc's backlog of calls not yet picked up (see start_grpc_server); None keeps
    # grpc's default (shedding from 1,000, all beyond 3,000).
    max_pending_calls: int | None = None
    log_level: str = "INFO"
    # Worker processes behind one port (snaplearn_vision.workers): each its own interpreter,
    # GIL, event loop and model copy; the kernel spreads connections over them (SO_REUSEPORT).
    workers: int = 1
    # Set by the supervisor in each worker it starts: bind with SO_REUSEPORT only once the model
    # is loaded, metrics on 127.0.0.1 (the supervisor serves the sum), no ready line on stdout.
    worker_index: int | None = None
    bus: BusSettings | None = field(default=None)  # None: no events published (tests, dry runs)
    # Where events wait, on disk, while the bus is unreachable (and across restarts); None
    # keeps them in memory only. The command line defaults it to var/spool.
    spool_dir: Path | None = None

    def __post_init__(self) -> None:
        problems = []
        for name in ("port", "metrics_port"):
            value = getattr(self, name)
            if not 0 <= value <= 65535:
                problems.append(f"{name} must be in 0..65535, got {value}")
        if not self.model_name:
            problems.append("model_name must not be empty")
        if self.max_batch_size is not None and self.max_batch_size < 1:
            problems.append(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.max_queue_delay_ms is not None and not self.max_queue_delay_ms >= 0:
            problems.append(f"max_queue_delay_ms must be >= 0, got {self.max_queue_delay_ms}")
        if self.max_queue_size < 1:
            problems.append(f"max_queue_size must be >= 1, got {self.max_queue_size}")
        if self.decode_threads < 1:
            problems.append(f"decode_threads must be >= 1, got {self.decode_threads}")
        if self.decoder not in DECODERS:
            problems.append(f"decoder must be one of {', '.join(DECODERS)}, got {self.decoder!r}")
        if not 0 <= self.decode_niceness <= 19:
            problems.append(f"decode_niceness must be in 0..19, got {self.decode_niceness}")
        if not 0.01 <= self.gil_switch_interval_ms <= 100:
            problems.append(f"gil_switch_interval_ms must be in 0.01..100, got {self.gil_switch_interval_ms}")
        if self.max_image_bytes < 1:
            problems.append(f"max_image_bytes must be >= 1, got {self.max_image_bytes}")
        if self.device not in DEVICES:
            problems.append(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.torch_threads is not None and self.torch_threads < 1:
            problems.append(f"torch_threads must be >= 1, got {self.torch_threads}")
        if self.precision not in PRECISIONS:
            problems.append(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.shutdown_grace_s < 0:
            problems.append(f"shutdown_grace_s must be >= 0, got {self.shutdown_grace_s}")
        if self.max_connection_age_s is not None and not self.max_connection_age_s > 0:
            problems.append(f"max_connection_age_s must be > 0, got {self.max_connection_age_s}")
        if self.max_concurrent_rpcs is not None and self.max_concurrent_rpcs < 0:
            problems.append(f"max_concurrent_rpcs must be >= 0, got {self.max_concurrent_rpcs}")
        if self.max_pending_calls is not None and self.max_pending_calls < 2:
            problems.append(f"max_pending_calls must be >= 2, got {self.max_pending_calls}")
        if self.workers < 1:
            problems.append(f"workers must be >= 1, got {self.workers}")
        if self.worker_index is not None and self.worker_index < 0:
            problems.append(f"worker_index must be >= 0, got {self.worker_index}")
        if problems:
            raise ValueError("invalid vision server settings: " + "; ".join(problems))

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


def _env(name: str, default: object) -> object:
    """Environment fallback for a flag; argparse converts string defaults with the flag's type."""
    return os.environ.get(ENV_PREFIX + name, default)


def _optional_seconds(text: str) -> float | None:
    seconds = float(text) if text.strip() else 0.0
    return seconds if seconds > 0 else None


def _optional_int(text: str) -> int | None:
    return None if text.strip().lower() in ("", "none", "model") else int(text)


def _optional_count(text: str) -> int | None:
    """A count where 0 (or nothing) means "not set"."""
    value = int(text) if text.strip() else 0
    return value if value > 0 else None


def _rpc_cap(text: str) -> int | None:
    return None if text.strip().lower() == "auto" else int(text)


def _optional_float(text: str) -> float | None:
    return None if text.strip().lower() in ("", "none", "model") else float(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="snaplearn-vision",
        description="SnapLearn vision server: classifies worksheet photos over gRPC and publishes "
        "ImageClassified events. Every flag also reads SNAPLEARN_VISION_<FLAG> from the environment "
        "(e.g. SNAPLEARN_VISION_PORT).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    net = parser.add_argument_group("network")
    net.add_argument("--host", default=_env("HOST", "127.0.0.1"), help="interface to bind")
    net.add_argument("--port", type=int, default=_env("PORT", DEFAULT_PORT), help="gRPC port (0 = pick)")
    net.add_argument(
        "--metrics-port",
        type=int,
        default=_env("METRICS_PORT", DEFAULT_METRICS_PORT),
        help="Prometheus /metrics port (0 = pick)",
    )
    net.add_argument(
        "--ready-file",
        type=Path,
        default=_env("READY_FILE", None),
        help="once serving, write {host, port, metrics_port, pid} as JSON here",
    )
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model-repository",
        type=Path,
        default=_env("MODEL_REPOSITORY", DEFAULT_MODEL_REPOSITORY),
        help="folder of <name>/<version>/ model directories",
    )
    model.add_argument("--model-name", default=_env("MODEL_NAME", DEFAULT_MODEL_NAME), help="default model")
    model.add_argument(
        "--model-version",
        default=_env("MODEL_VERSION", DEFAULT_MODEL_VERSION),
        help="default model's version ('' = latest)",
    )
    model.add_argument("--device", choices=DEVICES, default=_env("DEVICE", "auto"))
    model.add_argument(
        "--torch-threads", type=_optional_int, default=_env("TORCH_THREADS", None), help="intra-op threads"
    )
    model.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=_env("PRECISION", "fp32"),
        help="model precision (GPU only)",
    )
    model.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=_env("CHANNELS_LAST", "1") not in ("0", "false", "False"),
        help="NHWC memory format for the model and its inputs",
    )
    model.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=_env("COMPILE", "0") in ("1", "true", "True"),
        help="torch.compile the model (GPU only)",
    )
    batching = parser.add_argument_group("batching")
    batching.add_argument(
        "--max-batch-size",
        type=_optional_int,
        default=_env("MAX_BATCH_SIZE", None),
        help="override the model's max batch size",
    )
    batching.add_argument(
        "--max-queue-delay-ms",
        type=_optional_float,
        default=_env("MAX_QUEUE_DELAY_MS", None),
        help="override the model's max queue delay",
    )
    batching.add_argument(
        "--max-queue-size",
        type=int,
        default=_env("MAX_QUEUE_SIZE", DEFAULT_MAX_QUEUE_SIZE),
        help="requests waiting per model before RESOURCE_EXHAUSTED",
    )
    batching.add_argument(
        "--decode-threads",
        type=int,
        default=_env("DECODE_THREADS", DEFAULT_DECODE_THREADS),
        help="how many decoders (threads, or processes with --decoder processes) decode and resize images",
    )
    batching.add_argument(
        "--decoder",
        default=_env("DECODER", DEFAULT_DECODER),
        help="where photos are decoded: 'threads' of the server process, or 'processes' of their own "
        "(out of the server's GIL; one feeding thread each)",
    )
    batching.add_argument(
        "--decode-niceness",
        type=int,
        default=_env("DECODE_NICENESS", DEFAULT_DECODE_NICENESS),
        help="decode threads run this much nicer than the event loop and model thread (0 = as nice)",
    )
    batching.add_argument(
        "--gil-switch-interval-ms",
        type=float,
        default=_env("GIL_SWITCH_INTERVAL_MS", DEFAULT_GIL_SWITCH_INTERVAL_MS),
        help="how long the event loop or a decode thread may hold the GIL while another thread "
        "waits for it (Python's own is 5)",
    )
    batching.add_argument(
        "--max-image-bytes",
        type=int,
        default=_env("MAX_IMAGE_BYTES", DEFAULT_MAX_IMAGE_BYTES),
        help="larger images are rejected with INVALID_ARGUMENT",
    )
    batching.add_argument(
        "--max-concurrent-rpcs",
        type=_rpc_cap,
        default=_env("MAX_CONCURRENT_RPCS", "0"),
        help="grpc refuses calls beyond this many in flight (RESOURCE_EXHAUSTED, 'Concurrent RPC "
        "limit exceeded!') before our code runs; 'auto' = queue size + 2 batches + 32; 0 = no cap",
    )
    batching.add_argument(
        "--max-pending-calls",
        type=_optional_count,
        default=_env("MAX_PENDING_CALLS", None),
        help="calls grpc may hold before Python picks them up; beyond, grpc sheds them at once "
        "(CANCELLED), from half of it with rising probability; 0 = grpc's default (1000/3000)",
    )
    ops = parser.add_argument_group("operations")
    ops.add_argument("--shutdown-grace", type=float, default=_env("SHUTDOWN_GRACE_S", 10.0), help="seconds")
    ops.add_argument(
        "--max-connection-age",
        type=_optional_seconds,
        default=_env("MAX_CONNECTION_AGE_S", None),
        help="seconds before a client connection is closed (GOAWAY) so clients re-resolve; 0 = never",
    )
    ops.add_argument("--log-level", default=_env("LOG_LEVEL", "INFO"))
    ops.add_argument(
        "--workers",
        type=int,
        default=_env("WORKERS", 1),
        help="server processes behind the one port, each with its own model copy (worth it for "
        "small models: one process is bound by its GIL; see docs/DECISIONS.md, D18)",
    )
    # Internal: the supervisor passes each worker its index.
    ops.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    add_bus_arguments(parser)
    parser.add_argument(
        "--publish",
        action=argparse.BooleanOptionalAction,
        default=_env("PUBLISH", "1") not in ("0", "false", "False"),
        help="publish an ImageClassified event per prediction (--no-publish: inference only, no "
        "event bus at all; benchmarks against servers that publish nothing)",
    )
    parser.add_argument(
        "--spool-dir",
        default=_env("SPOOL_DIR", "var/spool"),
        help="events wait here while the event bus is unreachable ('' = in memory only)",
    )
    return parser


def settings_from_args(argv: Sequence[str] | None = None) -> VisionSettings:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return VisionSettings(
            host=args.host,
            port=args.port,
            metrics_port=args.metrics_port,
            model_repository=args.model_repository,
            model_name=args.model_name,
            model_version=args.model_version,
            max_batch_size=args.max_batch_size,
            max_queue_delay_ms=args.max_queue_delay_ms,
            max_queue_size=args.max_queue_size,
            decode_threads=args.decode_threads,
            decode_niceness=args.decode_niceness,
            decoder=args.decoder,
            gil_switch_interval_ms=args.gil_switch_interval_ms,
            max_image_bytes=args.max_image_bytes,
            device=args.device,
            torch_threads=args.torch_threads,
            precision=args.precision,
            channels_last=args.channels_last,
            compile_model=args.compile,
            ready_file=args.ready_file,
            shutdown_grace_s=args.shutdown_grace,
            max_connection_age_s=args.max_connection_age,
            max_concurrent_rpcs=args.max_concurrent_rpcs,
            max_pending_calls=args.max_pending_calls,
            log_level=args.log_level.upper(),
            workers=args.workers,
            worker_index=args.worker_index,
            bus=bus_settings_from_args(args) if args.publish else None,
            spool_dir=Path(args.spool_dir) if args.spool_dir else None,
        )
    except (ValueError, InvalidInput) as exc:
        parser.error(str(exc))
