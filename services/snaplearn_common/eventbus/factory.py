"""Choosing and opening the event bus: settings, the shared CLI flags, and open_bus().

Both servers' main() call add_bus_arguments(parser) and then
open_bus(bus_settings_from_args(args)), so they agree on flags and environment variables:

  --bus embedded|kafka      SNAPLEARN_BUS               (default embedded)
  --bus-path PATH           SNAPLEARN_BUS_PATH          (default var/bus.db)
  --kafka-bootstrap HOSTS   SNAPLEARN_KAFKA_BOOTSTRAP   (default localhost:9092)
  --bus-partitions N        SNAPLEARN_BUS_PARTITIONS    (default 4)
  --bus-topic NAME          SNAPLEARN_BUS_TOPIC         (default snaplearn.image-classified.v1;
                                                         its dead-letter topic is NAME.dlq)
  --bus-session-timeout S   SNAPLEARN_BUS_SESSION_TIMEOUT (default 10; a consumer that dies
                                                         keeps its partitions this long)

Kafka security settings (kafka-python argument names) come only from the environment,
so that secrets never appear in a process listing: SNAPLEARN_KAFKA_SECURITY_PROTOCOL,
SNAPLEARN_KAFKA_SASL_MECHANISM, SNAPLEARN_KAFKA_SASL_PLAIN_USERNAME,
SNAPLEARN_KAFKA_SASL_PLAIN_PASSWORD, SNAPLEARN_KAFKA_SSL_CAFILE, SNAPLEARN_KAFKA_SSL_CERTFILE,
SNAPLEARN_KAFKA_SSL_KEYFILE.
"""

from __future__ import annotations

import argparse
import importlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, cast

from snaplearn_common.errors import InvalidInput
from snaplearn_common.eventbus.base import EventBus
from snaplearn_common.events import IMAGE_CLASSIFIED_TOPIC

Backend = Literal["embedded", "kafka"]
BACKENDS: tuple[Backend, ...] = ("embedded", "kafka")

DEFAULT_EMBEDDED_PATH = "var/bus.db"
DEFAULT_KAFKA_BOOTSTRAP = "localhost:9092"
DEFAULT_PARTITIONS = 4

ENV_BACKEND = "SNAPLEARN_BUS"
ENV_EMBEDDED_PATH = "SNAPLEARN_BUS_PATH"
ENV_KAFKA_BOOTSTRAP = "SNAPLEARN_KAFKA_BOOTSTRAP"
ENV_PARTITIONS = "SNAPLEARN_BUS_PARTITIONS"
ENV_TOPIC = "SNAPLEARN_BUS_TOPIC"
ENV_SESSION_TIMEOUT = "SNAPLEARN_BUS_SESSION_TIMEOUT"
# kafka-python keyword -> environment variable.
KAFKA_SECURITY_ENV: Mapping[str, str] = {
    "security_protocol": "SNAPLEARN_KAFKA_SECURITY_PROTOCOL",
    "sasl_mechanism": "SNAPLEARN_KAFKA_SASL_MECHANISM",
    "sasl_plain_username": "SNAPLEARN_KAFKA_SASL_PLAIN_USERNAME",
    "sasl_plain_password": "SNAPLEARN_KAFKA_SASL_PLAIN_PASSWORD",
    "ssl_cafile": "SNAPLEARN_KAFKA_SSL_CAFILE",
    "ssl_certfile": "SNAPLEARN_KAFKA_SSL_CERTFILE",
    "ssl_keyfile": "SNAPLEARN_KAFKA_SSL_KEYFILE",
}


@dataclass(frozen=True)
class BusSettings:
    """Which event bus to use and how to reach it.

    partitions: used when a topic is created (create_topic at startup, or the embedded
    bus's auto-creation). kafka_security: passed through to the Kafka clients unchanged;
    it is left out of repr so that a logged settings object never shows a password.
    """

    backend: Backend = "embedded"
    embedded_path: str = DEFAULT_EMBEDDED_PATH
    kafka_bootstrap_servers: str = DEFAULT_KAFKA_BOOTSTRAP
    partitions: int = DEFAULT_PARTITIONS
    # The ImageClassified topic (one deployment can run several systems on one cluster).
    topic: str = IMAGE_CLASSIFIED_TOPIC
    session_timeout_s: float = 10.0
    # Producer timeouts (Kafka): send blocks at most kafka_max_block_s (the publisher's thread
    # must get back to spooling while the cluster is down); a record is retried for
    # kafka_delivery_timeout_s before flush reports it as DeliveryFailed.
    kafka_max_block_s: float = 5.0
    kafka_request_timeout_s: float = 30.0
    kafka_delivery_timeout_s: float = 120.0
    kafka_security: Mapping[str, str] = field(default_factory=dict, repr=False, hash=False)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise InvalidInput(
                f"unknown event bus backend {self.backend!r}; choose one of {', '.join(BACKENDS)}"
            )
        if self.partitions < 1:
            raise InvalidInput(f"partitions must be at least 1, got {self.partitions}")
        for name in (
            "session_timeout_s",
            "kafka_max_block_s",
            "kafka_request_timeout_s",
            "kafka_delivery_timeout_s",
        ):
            if getattr(self, name) <= 0:
                raise InvalidInput(f"{name} must be positive")


def open_bus(settings: BusSettings) -> EventBus:
    """Open the configured bus; the caller closes it."""
    if settings.backend == "kafka":
        # Imported lazily: kafka-python is an optional dependency the embedded bus never needs.
        kafka_module = importlib.import_module("snaplearn_common.eventbus.kafka")
        return cast(EventBus, kafka_module.KafkaEventBus.from_settings(settings))
    from snaplearn_common.eventbus.sqlite import SqliteEventBus

    path = Path(settings.embedded_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return SqliteEventBus(
        path, session_timeout_s=settings.session_timeout_s, auto_create_partitions=settings.partitions
    )


def add_bus_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the event bus flags; defaults are resolved (flag, then environment, then built-in) later."""
    group = parser.add_argument_group("event bus")
    group.add_argument(
        "--bus",
        choices=BACKENDS,
        default=None,
        help=f"event bus backend (env {ENV_BACKEND}; default embedded)",
    )
    group.add_argument(
        "--bus-path",
        default=None,
        help=f"embedded bus database file, shared by the servers (env {ENV_EMBEDDED_PATH}; "
        f"default {DEFAULT_EMBEDDED_PATH})",
    )
    group.add_argument(
        "--kafka-bootstrap",
        default=None,
        help=f"Kafka bootstrap servers, host:port[,host:port] (env {ENV_KAFKA_BOOTSTRAP}; "
        f"default {DEFAULT_KAFKA_BOOTSTRAP})",
    )
    group.add_argument(
        "--bus-partitions",
        type=int,
        default=None,
        help=f"partitions for topics this process creates (env {ENV_PARTITIONS}; "
        f"default {DEFAULT_PARTITIONS})",
    )
    group.add_argument(
        "--bus-topic",
        default=None,
        help=f"topic of ImageClassified events; dead letters go to <topic>.dlq (env {ENV_TOPIC}; "
        f"default {IMAGE_CLASSIFIED_TOPIC})",
    )
    group.add_argument(
        "--bus-session-timeout",
        type=float,
        default=None,
        help=f"seconds a crashed consumer keeps its partitions (env {ENV_SESSION_TIMEOUT}; default 10; "
        "Kafka brokers accept 6..1800 by default)",
    )


def bus_settings_from_args(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> BusSettings:
    """Settings from parsed flags, falling back to the environment, then to the defaults."""
    env = os.environ if environ is None else environ

    def pick(flag_value: str | None, env_name: str, default: str) -> str:
        if flag_value is not None:
            return flag_value
        return env.get(env_name) or default

    backend = pick(getattr(args, "bus", None), ENV_BACKEND, "embedded")
    if backend not in BACKENDS:
        raise InvalidInput(f"{ENV_BACKEND}={backend!r} is not a backend; choose one of {', '.join(BACKENDS)}")
    partitions_flag = getattr(args, "bus_partitions", None)
    partitions_text = pick(
        None if partitions_flag is None else str(partitions_flag), ENV_PARTITIONS, str(DEFAULT_PARTITIONS)
    )
    try:
        partitions = int(partitions_text)
    except ValueError:
        raise InvalidInput(f"{ENV_PARTITIONS}={partitions_text!r} is not an integer") from None
    security = {key: env[name] for key, name in KAFKA_SECURITY_ENV.items() if env.get(name)}
    session_flag = getattr(args, "bus_session_timeout", None)
    session_text = pick(None if session_flag is None else str(session_flag), ENV_SESSION_TIMEOUT, "10")
    try:
        session_timeout_s = float(session_text)
    except ValueError:
        raise InvalidInput(f"{ENV_SESSION_TIMEOUT}={session_text!r} is not a number") from None
    return BusSettings(
        backend=cast(Backend, backend),
        embedded_path=pick(getattr(args, "bus_path", None), ENV_EMBEDDED_PATH, DEFAULT_EMBEDDED_PATH),
        kafka_bootstrap_servers=pick(
            getattr(args, "kafka_bootstrap", None), ENV_KAFKA_BOOTSTRAP, DEFAULT_KAFKA_BOOTSTRAP
        ),
        partitions=partitions,
        topic=pick(getattr(args, "bus_topic", None), ENV_TOPIC, IMAGE_CLASSIFIED_TOPIC),
        session_timeout_s=session_timeout_s,
        kafka_security=security,
    )
