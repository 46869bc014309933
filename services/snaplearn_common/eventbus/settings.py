"""BusSettings: which event bus a process uses and how to reach it, shared by both servers.

A process nests it (`bus: BusSettings = Field(default_factory=BusSettings)`); its flags and
environment variables keep their names whatever the process's own prefix:

  --bus embedded|kafka      SNAPLEARN_BUS
  --bus-path PATH           SNAPLEARN_BUS_PATH
  --kafka-bootstrap HOSTS   SNAPLEARN_KAFKA_BOOTSTRAP
  --bus-partitions N        SNAPLEARN_BUS_PARTITIONS
  --bus-topic NAME          SNAPLEARN_BUS_TOPIC (its dead-letter topic is NAME.dlq)
  --bus-session-timeout S   SNAPLEARN_BUS_SESSION_TIMEOUT
  --bus-retention-age S     SNAPLEARN_BUS_RETENTION_AGE      (embedded bus; 0 = keep forever)
  --bus-retention-bytes N   SNAPLEARN_BUS_RETENTION_BYTES    (embedded bus, per partition; 0 = no limit)
  --bus-retention-check-interval S  SNAPLEARN_BUS_RETENTION_CHECK_INTERVAL

Kafka security settings (kafka-python argument names) come only from the environment, so
that secrets never appear in a process listing: SNAPLEARN_KAFKA_SECURITY_PROTOCOL,
SNAPLEARN_KAFKA_SASL_MECHANISM, SNAPLEARN_KAFKA_SASL_PLAIN_USERNAME,
SNAPLEARN_KAFKA_SASL_PLAIN_PASSWORD (a SecretStr: never in repr or logs),
SNAPLEARN_KAFKA_SSL_CAFILE, SNAPLEARN_KAFKA_SSL_CERTFILE, SNAPLEARN_KAFKA_SSL_KEYFILE.
An empty variable counts as unset.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field, SecretStr

from snaplearn_common.events import IMAGE_CLASSIFIED_TOPIC
from snaplearn_common.settings import Cli, Settings, SettingsConfigDict

Backend = Literal["embedded", "kafka"]
BACKENDS: tuple[Backend, ...] = ("embedded", "kafka")

_SECRET = Cli(env_only=True)
# kafka-python keyword of each security field (the field is named kafka_<keyword>).
_SECURITY_KEYWORDS = (
    "security_protocol",
    "sasl_mechanism",
    "sasl_plain_username",
    "sasl_plain_password",
    "ssl_cafile",
    "ssl_certfile",
    "ssl_keyfile",
)


class BusSettings(Settings):
    """Which event bus to use and how to reach it."""

    model_config = SettingsConfigDict(env_prefix="SNAPLEARN_", env_ignore_empty=True)
    cli_group: ClassVar[str | None] = "event bus"

    backend: Annotated[Backend, Cli(flag="--bus")] = Field(
        default="embedded", validation_alias="SNAPLEARN_BUS", description="event bus backend"
    )
    embedded_path: Annotated[str, Cli(flag="--bus-path", metavar="PATH")] = Field(
        default="var/bus.db",
        validation_alias="SNAPLEARN_BUS_PATH",
        description="embedded bus database file, shared by the servers",
    )
    kafka_bootstrap_servers: Annotated[str, Cli(flag="--kafka-bootstrap", metavar="HOSTS")] = Field(
        default="localhost:9092",
        validation_alias="SNAPLEARN_KAFKA_BOOTSTRAP",
        description="Kafka bootstrap servers, host:port[,host:port]",
    )
    # Used when a topic is created (create_topic at startup, or the embedded bus's auto-creation).
    partitions: Annotated[int, Cli(flag="--bus-partitions", metavar="N")] = Field(
        default=4,
        ge=1,
        validation_alias="SNAPLEARN_BUS_PARTITIONS",
        description="partitions for topics this process creates",
    )
    # One deployment can run several systems on one cluster, each on its own topic.
    topic: Annotated[str, Cli(flag="--bus-topic", metavar="NAME")] = Field(
        default=IMAGE_CLASSIFIED_TOPIC,
        min_length=1,
        validation_alias="SNAPLEARN_BUS_TOPIC",
        description="topic of the events; dead letters go to <topic>.dlq",
    )
    session_timeout_s: Annotated[float, Cli(flag="--bus-session-timeout", metavar="S")] = Field(
        default=10.0,
        gt=0,
        validation_alias="SNAPLEARN_BUS_SESSION_TIMEOUT",
        description="seconds a crashed consumer keeps its partitions (Kafka brokers accept 6..1800 "
        "by default)",
    )
    # The embedded log's retention, like Kafka's retention.ms / retention.bytes (a Kafka topic's
    # retention is the cluster's business). Only records every consumer group has committed
    # past are deleted, so the defaults bound the disk without losing what a consumer needs.
    retention_age_s: Annotated[float, Cli(flag="--bus-retention-age", metavar="S")] = Field(
        default=7 * 24 * 3600.0,
        ge=0,
        validation_alias="SNAPLEARN_BUS_RETENTION_AGE",
        description="embedded bus: delete consumed records older than this many seconds (0: never)",
    )
    retention_bytes: Annotated[int, Cli(flag="--bus-retention-bytes", metavar="N")] = Field(
        default=256 * 1024 * 1024,
        ge=0,
        validation_alias="SNAPLEARN_BUS_RETENTION_BYTES",
        description="embedded bus: keep at most this many bytes of records per partition, deleting "
        "the oldest consumed ones (0: no limit)",
    )
    retention_check_interval_s: Annotated[float, Cli(flag="--bus-retention-check-interval", metavar="S")] = (
        Field(
            default=60.0,
            gt=0,
            validation_alias="SNAPLEARN_BUS_RETENTION_CHECK_INTERVAL",
            description="embedded bus: seconds between retention passes (run by producers)",
        )
    )
    # Kafka producer timeouts: a send blocks at most max_block (the publisher's thread must get
    # back to spooling while the cluster is down); a batch is retried for delivery_timeout
    # before it fails.
    kafka_max_block_s: Annotated[float, Cli(metavar="S")] = Field(
        default=5.0, gt=0, description="Kafka: seconds a send may wait for metadata or buffer space"
    )
    kafka_request_timeout_s: Annotated[float, Cli(metavar="S")] = Field(
        default=30.0, gt=0, description="Kafka: seconds a request waits for the broker's answer"
    )
    kafka_delivery_timeout_s: Annotated[float, Cli(metavar="S")] = Field(
        default=120.0, gt=0, description="Kafka: seconds a record is retried before it counts as failed"
    )
    kafka_security_protocol: Annotated[str | None, _SECRET] = None
    kafka_sasl_mechanism: Annotated[str | None, _SECRET] = None
    kafka_sasl_plain_username: Annotated[str | None, _SECRET] = None
    kafka_sasl_plain_password: Annotated[SecretStr | None, _SECRET] = None
    kafka_ssl_cafile: Annotated[str | None, _SECRET] = None
    kafka_ssl_certfile: Annotated[str | None, _SECRET] = None
    kafka_ssl_keyfile: Annotated[str | None, _SECRET] = None

    @property
    def kafka_security(self) -> dict[str, str]:
        """The security settings that are set, as kafka-python keyword arguments (password
        included: pass it to the Kafka clients, never to a log)."""
        security: dict[str, str] = {}
        for keyword in _SECURITY_KEYWORDS:
            value = getattr(self, "kafka_" + keyword)
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            if value:
                security[keyword] = value
        return security
