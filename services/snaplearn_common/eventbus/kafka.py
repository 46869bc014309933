"""The Apache Kafka backend, over kafka-python (>= 3).

The interface (base.py) was written for Kafka's semantics, so this is mostly a thin
adapter; what it adds:

- Delivery: producers use acks=all + idempotence, so `send_batch` returning means every
  record of the batch is on all in-sync replicas, once (no duplicates from the producer's
  own retries). kafka-python reports per-record failures only through futures, which
  send_batch reads after flushing and turns into one DeliveryFailed.
- Partitioning: keyed records use kafka-python's DefaultPartitioner, i.e. Kafka's murmur2
  rule, which is `base.partition_for_key`; records of one user land on the same partition
  here and on the embedded backend.
- Offsets are committed manually (enable_auto_commit=False): the recommender commits only
  after a model update has absorbed the records (at-least-once).
- `seek` before the group has assigned the partition is remembered and applied when it
  is assigned, since a subscribed consumer learns its partitions only while polling.
- A cluster that cannot be reached is `Unavailable` (creating a client, admin calls), and a
  producer created while it is down connects on its first batch, so a process can start
  during an outage. kafka-python's own logging is raised to CRITICAL unless the process
  configured the `kafka` logger: it logs every failed reconnect, hundreds of lines an
  outage; the callers report an outage once (worker.py).
- Static group membership (group_instance_id): a member restarted under the same instance
  id gets its partitions back at once, instead of after the dead member's session timeout.
- Two kafka-python 3.0.x defects are worked around (see `_patch_group_join` and
  `KafkaBusProducer`): a group join whose result arrives between polls was lost, and one
  non-retriable delivery error disabled an idempotent producer for good.

kafka-python objects are not thread-safe: use each Consumer from one thread. Producers
are thread-safe.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, is_dataclass
from typing import Any, Literal

import kafka.errors as kafka_errors
from kafka import (
    ConsumerRebalanceListener,
    KafkaAdminClient,
    KafkaConsumer,
    KafkaProducer,
    OffsetAndMetadata,
)
from kafka import TopicPartition as KafkaTopicPartition
from kafka.codec import has_lz4, has_zstd

from snaplearn_common.errors import InvalidInput, NotFound, Unavailable
from snaplearn_common.eventbus.base import (
    Consumer,
    DeliveryFailed,
    EventBus,
    Producer,
    ProducerRecord,
    Record,
    TopicPartition,
)
from snaplearn_common.eventbus.settings import BusSettings

log = logging.getLogger(__name__)

OffsetReset = Literal["earliest", "latest"]

# Kafka's rule for topic names (org.apache.kafka.common.internals.Topic), checked here so a
# bad name fails with a clear error instead of a broker error code.
_TOPIC_NAME = re.compile(r"^[A-Za-z0-9._-]{1,249}$")

# The client settings that carry security (TLS, SASL); everything else about the
# connection is chosen by this module. Checked against kafka-python's own config keys so a
# typo fails at startup rather than being silently ignored.
_SECURITY_PREFIXES = ("security_protocol", "sasl_", "ssl_")
_BOOLEAN_SECURITY_KEYS = frozenset({"ssl_check_hostname"})
_CLIENT_ID = "snaplearn"


def _validate_topic_name(topic: str) -> None:
    if not _TOPIC_NAME.match(topic) or topic in (".", ".."):
        raise InvalidInput(f"invalid topic name {topic!r}: use 1-249 characters from [A-Za-z0-9._-]")


def _to_kafka_tp(tp: TopicPartition | tuple[str, int]) -> KafkaTopicPartition:
    # kafka-python checks isinstance(..., its own TopicPartition) in seek/committed.
    return KafkaTopicPartition(tp[0], tp[1])


def _to_tp(tp: tuple[str, int]) -> TopicPartition:
    return TopicPartition(tp[0], tp[1])


def _parse_bootstrap(servers: str | Sequence[str]) -> list[str]:
    items = servers.split(",") if isinstance(servers, str) else list(servers)
    result = [item.strip() for item in items if item and item.strip()]
    if not result:
        raise InvalidInput("kafka bootstrap servers must name at least one host:port")
    return result


def _coerce_bool(key: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise InvalidInput(f"kafka setting {key} must be true or false, got {value!r}")


def security_config(security: Mapping[str, Any] | object | None) -> dict[str, Any]:
    """kafka-python keyword arguments for TLS/SASL from settings (a mapping or a dataclass).

    Keys are kafka-python's names (security_protocol, sasl_mechanism, sasl_plain_username,
    ssl_cafile, ...); None values are dropped so that unset settings keep the defaults.
    """
    if security is None:
        return {}
    if is_dataclass(security) and not isinstance(security, type):
        items: Mapping[str, Any] = asdict(security)
    elif isinstance(security, Mapping):
        items = security
    else:
        raise InvalidInput(f"kafka security settings must be a mapping, not {type(security).__name__}")
    known = KafkaConsumer.DEFAULT_CONFIG.keys() & KafkaProducer.DEFAULT_CONFIG.keys()
    config: dict[str, Any] = {}
    for key, value in items.items():
        if value is None:
            continue
        if not key.startswith(_SECURITY_PREFIXES) or key not in known:
            raise InvalidInput(
                f"unknown kafka security setting {key!r}; expected security_protocol, sasl_* or ssl_* "
                "options of kafka-python (e.g. sasl_mechanism, sasl_plain_username, ssl_cafile)"
            )
        config[key] = _coerce_bool(key, value) if key in _BOOLEAN_SECURITY_KEYS else value
    protocol = config.get("security_protocol")
    if isinstance(protocol, str):
        config["security_protocol"] = protocol.upper()
    return config


def default_compression() -> str:
    """The cheapest codec available: lz4/zstd need optional packages, gzip is in the stdlib."""
    if has_lz4():
        return "lz4"
    if has_zstd():
        return "zstd"
    return "gzip"


def _unreachable(bootstrap: Sequence[str], exc: BaseException) -> Unavailable:
    return Unavailable(f"cannot reach Kafka at {','.join(bootstrap)}: {type(exc).__name__}: {exc}")


# kafka-python errors that mean "the cluster cannot be reached now", not "the request is wrong".
_UNREACHABLE_ERRORS = (
    kafka_errors.KafkaTimeoutError,
    kafka_errors.KafkaConnectionError,
    kafka_errors.NodeNotReadyError,
    kafka_errors.RequestTimedOutError,
)


def quiet_client_logs() -> None:
    """Raise kafka-python's loggers to CRITICAL unless the process set a level for them itself.

    kafka-python logs each failed (re)connect at WARNING/ERROR, with tracebacks; an outage
    is reported once by the callers instead. `--log-level DEBUG` keeps the library quiet too:
    set the `kafka` logger's level explicitly to see its lines.
    """
    library = logging.getLogger("kafka")
    if library.level == logging.NOTSET:
        library.setLevel(logging.CRITICAL)


_JOIN_PATCH_ATTRIBUTES = (
    "_join_task",
    "_lock",
    "_generation",
    "_enable_heartbeat",
    "_on_join_complete_async",
    "join_group_async",
    "need_rejoin",
    "rejoining",
    "rejoin_needed",
    "state",
)


def _patch_group_join(kafka_consumer: Any) -> None:
    """Work around kafka-python 3.0.x losing the result of a group join.

    kafka-python runs JoinGroup+SyncGroup as a task that outlives a poll() that times out;
    the next poll is meant to pick up its result. Two paths lose it (two members polled
    in turn hit it often; the member then holds no partitions until the
    session timeout evicts it, or rejoins again and again):
    - the task completes between polls: the next poll sees a finished task and starts a
      new join instead of using it (a new rebalance for the whole group);
    - a leader rejoining because topic metadata changed: need_rejoin() turns False as soon
      as its own assignment is computed, so the next poll never waits for the SyncGroup.
    The patch applies a finished join's result the way kafka-python's own success path does,
    and reports need_rejoin() while a join is unapplied. Applied only if the coordinator
    still has the attributes it relies on; otherwise the library is used as is.
    """
    coordinator = getattr(kafka_consumer, "_coordinator", None)
    if coordinator is None or not all(hasattr(coordinator, name) for name in _JOIN_PATCH_ATTRIBUTES):
        log.debug("kafka-python coordinator layout changed; not patching group join")
        return
    try:
        from kafka.structs import MemberState
    except ImportError:
        return
    original_join = coordinator.join_group_async
    original_need_rejoin = coordinator.need_rejoin

    async def join_group_async(timeout_ms: Any = None) -> Any:
        task = coordinator._join_task
        if task is not None and task.is_done and task.succeeded():
            coordinator._join_task = None
            with coordinator._lock:
                coordinator.rejoining = False
                coordinator.rejoin_needed = False
                coordinator.state = MemberState.STABLE
                coordinator._enable_heartbeat()
            generation = coordinator._generation
            await coordinator._on_join_complete_async(
                generation.generation_id, generation.member_id, generation.protocol, task.value
            )
        return await original_join(timeout_ms)

    def need_rejoin() -> bool:
        if coordinator._join_task is not None:
            return True
        return bool(original_need_rejoin())

    coordinator.join_group_async = join_group_async
    coordinator.need_rejoin = need_rejoin


class KafkaEventBus(EventBus):
    """Producers and consumers on one Kafka cluster.

    bootstrap_servers: "host:port[,host:port...]" or a list of them.
    security: TLS/SASL options in kafka-python's names (see `security_config`).
    replication_factor: for topics created by `create_topic`; -1 uses the broker's
    default.replication.factor.
    session_timeout_s: a consumer that stops heartbeating (crashed process) loses its
    partitions after this long; a consumer that closes leaves at once.
    max_block_s: how long handing a record to kafka-python may block for topic metadata or
    buffer space; short, because the publisher's one thread must get back to spooling while
    the cluster is down.
    delivery_timeout_s: how long kafka-python retries a record before giving up on it, when
    the caller's send_batch timeout is longer (it then surfaces as DeliveryFailed).
    close_timeout_s: how long closing a producer waits for records still in flight.
    bootstrap_timeout_s: how long creating a client waits for a first broker.
    client_config: extra kafka-python settings for every client (tests, tuning).
    """

    def __init__(
        self,
        bootstrap_servers: str | Sequence[str],
        *,
        security: Mapping[str, Any] | object | None = None,
        replication_factor: int = -1,
        auto_offset_reset: OffsetReset = "earliest",
        session_timeout_s: float = 10.0,
        max_block_s: float = 5.0,
        request_timeout_s: float = 30.0,
        delivery_timeout_s: float = 120.0,
        close_timeout_s: float = 10.0,
        compression_type: str | None = None,
        client_config: Mapping[str, Any] | None = None,
        bootstrap_timeout_s: float = 10.0,
        quiet_library_logs: bool = True,
    ) -> None:
        if auto_offset_reset not in ("earliest", "latest"):
            raise InvalidInput(f"auto_offset_reset must be 'earliest' or 'latest', got {auto_offset_reset!r}")
        if replication_factor == 0 or replication_factor < -1:
            raise InvalidInput(f"replication_factor must be positive or -1, got {replication_factor}")
        self.bootstrap_servers = _parse_bootstrap(bootstrap_servers)
        self.replication_factor = replication_factor
        self.auto_offset_reset: OffsetReset = auto_offset_reset
        self.session_timeout_s = session_timeout_s
        self.max_block_s = max_block_s
        self.request_timeout_s = request_timeout_s
        # Kafka requires delivery.timeout.ms >= linger.ms (0: batches are flushed) + request.timeout.ms.
        self.delivery_timeout_s = max(delivery_timeout_s, request_timeout_s)
        self.close_timeout_s = close_timeout_s
        self.compression_type = compression_type or default_compression()
        self._common: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers,
            "client_id": _CLIENT_ID,
            "request_timeout_ms": int(request_timeout_s * 1000),
            # kafka-python backs off reconnects up to 30 s; the Java client's 1 s means a
            # returning broker is used again within a second instead of up to half a minute.
            "reconnect_backoff_max_ms": 1000,
            # A client created while the cluster is down fails (Unavailable) after this long
            # instead of kafka-python's 30 s, so its caller can retry, report or stop sooner.
            "bootstrap_timeout_ms": int(min(request_timeout_s, bootstrap_timeout_s) * 1000),
            **security_config(security),
            **dict(client_config or {}),
        }
        if quiet_library_logs:
            quiet_client_logs()
        self._lock = threading.Lock()
        self._admin: Any = None
        self._closed = False
        self._children: weakref.WeakSet[KafkaBusProducer | KafkaBusConsumer] = weakref.WeakSet()

    @classmethod
    def from_settings(cls, settings: BusSettings) -> KafkaEventBus:
        """The bus that BusSettings describe (bootstrap servers, security, timeouts)."""
        if not settings.kafka_bootstrap_servers:
            raise InvalidInput("the kafka bus needs bootstrap servers (--kafka-bootstrap host:9092)")
        return cls(
            settings.kafka_bootstrap_servers,
            security=settings.kafka_security,
            session_timeout_s=settings.session_timeout_s,
            max_block_s=settings.kafka_max_block_s,
            request_timeout_s=settings.kafka_request_timeout_s,
            delivery_timeout_s=settings.kafka_delivery_timeout_s,
        )

    # -- admin ---------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("event bus is closed")

    def _admin_client(self) -> Any:
        # Created on first use: a bus that only hands out consumers never needs one.
        if self._admin is None:
            try:
                self._admin = KafkaAdminClient(**self._common)
            except _UNREACHABLE_ERRORS as exc:
                raise _unreachable(self.bootstrap_servers, exc) from exc
        return self._admin

    @contextlib.contextmanager
    def _reaching(self) -> Iterator[None]:
        """Admin calls: an unreachable cluster is Unavailable, whatever kafka-python raised."""
        try:
            yield
        except _UNREACHABLE_ERRORS as exc:
            raise _unreachable(self.bootstrap_servers, exc) from exc

    def _describe(self, topic: str) -> dict[str, Any] | None:
        topics = self._admin_client().describe_topics([topic])
        for info in topics:
            if info.get("name") != topic:
                continue
            error = kafka_errors.for_code(info.get("error_code", 0))
            if error is kafka_errors.UnknownTopicOrPartitionError:
                return None
            if error is not kafka_errors.NoError:
                raise error(f"describing topic {topic!r}")
            return dict(info)
        return None

    def create_topic(self, topic: str, partitions: int) -> None:
        _validate_topic_name(topic)
        if partitions < 1:
            raise InvalidInput(f"a topic needs at least one partition, got {partitions}")
        with self._lock, self._reaching():
            self._check_open()
            admin = self._admin_client()
            # Idempotent: another process (or an earlier run) may have created it.
            with contextlib.suppress(kafka_errors.TopicAlreadyExistsError):
                admin.create_topics(
                    {topic: {"num_partitions": partitions, "replication_factor": self.replication_factor}},
                    timeout_ms=int(self.request_timeout_s * 1000),
                )
            # CreateTopics returns before every partition has a leader; producers and
            # consumers started right after would otherwise see "unknown topic" for a while.
            admin.wait_for_topics([topic], timeout_ms=int(self.request_timeout_s * 1000))
            info = self._describe(topic)
        existing = len(info["partitions"]) if info else partitions
        if existing != partitions:
            log.info("topic %s already exists with %d partitions (asked for %d)", topic, existing, partitions)

    def partitions_for(self, topic: str) -> int:
        _validate_topic_name(topic)
        with self._lock, self._reaching():
            self._check_open()
            info = self._describe(topic)
        if info is None:
            raise NotFound(f"no topic {topic!r}")
        return len(info["partitions"])

    def topic_exists(self, topic: str) -> bool:
        with self._lock, self._reaching():
            self._check_open()
            return self._describe(topic) is not None

    # -- clients -------------------------------------------------------------------------

    def producer(self) -> KafkaBusProducer:
        with self._lock:
            self._check_open()
        config = {
            **self._common,
            "acks": "all",
            # Idempotence: broker-side dedup of retried batches, so retries cannot duplicate
            # or reorder records within a partition.
            "enable_idempotence": True,
            "compression_type": self.compression_type,
            # No linger of its own: send_batch flushes each batch at once (the caller batches).
            "linger_ms": 0,
            "max_block_ms": int(self.max_block_s * 1000),
            "delivery_timeout_ms": int(self.delivery_timeout_s * 1000),
            # Topics are created explicitly with a partition count; never by a typo'd send.
            "allow_auto_create_topics": False,
        }
        producer = KafkaBusProducer(self, functools.partial(KafkaProducer, **config))
        with self._lock:
            self._children.add(producer)
        return producer

    def consumer(
        self,
        group_id: str,
        topics: Sequence[str],
        *,
        auto_offset_reset: OffsetReset | None = None,
        instance_id: str | None = None,
    ) -> KafkaBusConsumer:
        """instance_id: static membership (KIP-345). The member keeps its partitions across a
        restart under the same id (no rebalance, no wait for the session timeout after a
        crash); closing does not leave the group, so a *different* member gets them only
        after the session timeout. One process per instance id: a second one is fenced."""
        if not group_id:
            raise InvalidInput("group_id must not be empty")
        if isinstance(topics, str):
            raise InvalidInput("topics must be a sequence of topic names, not one string")
        if not topics:
            raise InvalidInput("a consumer needs at least one topic")
        for topic in topics:
            _validate_topic_name(topic)
        reset = auto_offset_reset or self.auto_offset_reset
        if reset not in ("earliest", "latest"):
            raise InvalidInput(f"auto_offset_reset must be 'earliest' or 'latest', got {reset!r}")
        with self._lock:
            self._check_open()
        session_ms = int(self.session_timeout_s * 1000)
        config = {
            **self._common,
            "group_id": group_id,
            "enable_auto_commit": False,
            "auto_offset_reset": reset,
            "allow_auto_create_topics": False,
            "session_timeout_ms": session_ms,
            # Classic group protocol: a member learns that a rebalance started (a consumer
            # joined or left) only from a heartbeat response, so frequent heartbeats make
            # rebalances finish sooner than with the default interval.
            "heartbeat_interval_ms": max(100, min(1000, session_ms // 3)),
        }
        if instance_id:
            _validate_topic_name(instance_id)  # the same character rule as kafka-python's
            config["group_instance_id"] = instance_id
        try:
            kafka_consumer = KafkaConsumer(**config)
        except _UNREACHABLE_ERRORS as exc:
            raise _unreachable(self.bootstrap_servers, exc) from exc
        _patch_group_join(kafka_consumer)
        consumer = KafkaBusConsumer(kafka_consumer, group_id, topics, self.request_timeout_s)
        with self._lock:
            self._children.add(consumer)
        return consumer

    def close(self) -> None:
        """Close the bus and every producer (flushing it) and consumer it handed out."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            children = list(self._children)
            admin, self._admin = self._admin, None
        errors: list[BaseException] = []
        for child in children:
            try:
                child.close()
            except Exception as exc:  # close the rest before reporting
                errors.append(exc)
        if admin is not None:
            admin.close()
        if errors:
            raise errors[0]


class KafkaBusProducer(Producer):
    """A KafkaProducer behind send_batch: send the batch, flush, then read each record's future.

    A record whose future failed is named in DeliveryFailed; permanent when the error is not
    retriable (the cluster rejected it for good, e.g. too large for the topic).

    Two situations replace the underlying KafkaProducer with a fresh one before the next
    batch. A flush that times out: the records it still holds must not reach the cluster
    after the caller was told they failed (it will send them again); closing it at once
    abandons them (only a request already on the wire can still land, as a duplicate that
    consumers drop by event id). A non-retriable delivery error: kafka-python (3.0) puts an
    idempotent producer into a permanent error state after one, failing every later record
    too, where the Java client fails only the affected batch.
    """

    def __init__(self, bus: KafkaEventBus, factory: Callable[[], Any]) -> None:
        super().__init__()
        self._bus = bus
        self._factory = factory
        self._lock = threading.Lock()  # one batch at a time, so a replacement never races a batch
        # Created on the first batch (and again after a failed creation), so that a producer can
        # be handed out while the cluster is down: its batches fail until it is back.
        self._producer: Any = None
        self._known_topics: set[str] = set()
        self._closed = False

    def check_topic(self, topic: str) -> None:
        if self._closed:
            raise RuntimeError("producer is closed")
        if topic not in self._known_topics:
            # kafka-python would wait max_block_ms for metadata of a missing topic (in case it
            # gets auto-created); topics are created explicitly here, so fail at once. Checked
            # once per topic: topics are not deleted under a running service.
            if not self._bus.topic_exists(topic):
                raise NotFound(f"no topic {topic!r}")
            self._known_topics.add(topic)

    def _connect(self) -> Any:
        if self._producer is None:
            try:
                self._producer = self._factory()
            except _UNREACHABLE_ERRORS as exc:
                raise _unreachable(self._bus.bootstrap_servers, exc) from exc
        return self._producer

    def _replace(self, why: str) -> None:
        log.warning("replacing the Kafka producer (%s)", why)
        old, self._producer = self._producer, None
        if old is not None:
            old.close(timeout=0)

    def send_batch(self, records: Sequence[ProducerRecord], timeout_s: float | None = None) -> None:
        if not records:
            return
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        if not self._lock.acquire(timeout=-1 if timeout_s is None else max(0.0, timeout_s)):
            raise DeliveryFailed("timed out waiting for another batch", range(len(records)))
        try:
            if self._closed:
                raise RuntimeError("producer is closed")
            try:
                self._connect()
            except Unavailable as exc:
                raise DeliveryFailed(str(exc), range(len(records))) from exc
            failures, permanent, timed_out = self._deliver(records, deadline)
            # A timed-out flush keeps its producer: building a new one blocks while the cluster is
            # unreachable, and the publisher must get back to spooling.
            if permanent and not timed_out:
                self._replace("a non-retriable delivery error")
        finally:
            self._lock.release()
        if failures:
            first = failures[min(failures)]
            # Never the payload: records carry student data. Failures that retrying can fix are
            # the caller's to report (once an outage, EventPublisher), not one line a batch.
            log.log(
                logging.ERROR if permanent else logging.DEBUG,
                "%d record(s) could not be delivered to Kafka (%d for good; first: %s)",
                len(failures),
                len(permanent),
                type(first).__name__,
            )
            raise DeliveryFailed(
                f"{len(failures)} record(s) not delivered: {type(first).__name__}: {first}",
                sorted(failures),
                sorted(permanent),
            ) from first

    def _deliver(
        self, records: Sequence[ProducerRecord], deadline: float | None
    ) -> tuple[dict[int, BaseException], set[int], bool]:
        """Under self._lock: (index -> error of each record not delivered, the indices rejected for
        good, whether the flush timed out)."""
        failures: dict[int, BaseException] = {}
        futures = []
        for index, record in enumerate(records):
            try:
                self.check_topic(record.topic)
                future = self._producer.send(
                    record.topic, value=record.value, key=record.key, headers=list(record.headers) or None
                )
            except (kafka_errors.KafkaTimeoutError, NotFound) as exc:
                # No metadata or no buffer space within max_block_ms (the cluster is unreachable
                # or not keeping up), or no such topic: this record and the rest are not sent,
                # and may be sent again once the cluster or the topic is back.
                failures.update(dict.fromkeys(range(index, len(records)), exc))
                break
            futures.append(future)
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        timeout_error: BaseException = TimeoutError(f"not acknowledged within {remaining} s")
        timed_out = False
        try:
            self._producer.flush(timeout=remaining)
        except kafka_errors.KafkaTimeoutError as exc:
            timed_out, timeout_error = True, exc
        permanent: set[int] = set()
        for index, future in enumerate(futures):
            if not future.is_done:
                failures[index] = timeout_error
            elif future.failed():
                failures[index] = future.exception
                if not getattr(future.exception, "retriable", False):
                    permanent.add(index)
        return failures, permanent, timed_out

    def close(self) -> None:
        """Flush what `send` queued for at most the bus's close_timeout_s, then close."""
        if self._closed:
            return
        try:
            self.flush(self._bus.close_timeout_s)
        except DeliveryFailed as exc:
            # The cluster is unreachable: closing must not hang the process's shutdown.
            log.warning("closing the Kafka producer with %d record(s) undelivered", len(exc.failed))
        finally:
            with self._lock:
                self._closed = True
                if self._producer is not None:
                    self._producer.close(timeout=0)


class _AssignmentListener(ConsumerRebalanceListener):
    """Applies seeks that were requested before the group assigned their partitions."""

    def __init__(self, owner: KafkaBusConsumer) -> None:
        self._owner = weakref.ref(owner)

    def on_partitions_revoked(self, revoked: Iterable[Any]) -> None:
        pass  # offsets are committed explicitly by the application

    def on_partitions_assigned(self, assigned: Iterable[Any]) -> None:
        owner = self._owner()
        if owner is not None:
            owner._apply_pending_seeks(assigned)


class KafkaBusConsumer(Consumer):
    """One member of a consumer group (a subscribed KafkaConsumer); use from one thread."""

    def __init__(self, consumer: Any, group_id: str, topics: Sequence[str], request_timeout_s: float) -> None:
        self.group_id = group_id
        self.topics = frozenset(topics)
        self._consumer = consumer
        self._timeout_ms = int(request_timeout_s * 1000)
        # Short: a commit that cannot reach the coordinator (cluster down) must not hold up the
        # caller's loop for a whole request timeout; the recommender's truth is its checkpoint.
        self._commit_timeout_ms = min(self._timeout_ms, 5000)
        # Guarded by a lock: the rebalance listener may run on kafka-python's IO thread.
        self._seek_lock = threading.Lock()
        self._pending_seeks: dict[TopicPartition, int] = {}
        self._closed = False
        consumer.subscribe(topics=sorted(self.topics), listener=_AssignmentListener(self))

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("consumer is closed")

    def _apply_pending_seeks(self, assigned: Iterable[Any]) -> None:
        with self._seek_lock:
            for ktp in assigned:
                offset = self._pending_seeks.pop(_to_tp(ktp), None)
                if offset is not None:
                    self._consumer.seek(_to_kafka_tp(ktp), offset)

    def poll(self, max_records: int = 500, timeout_s: float = 1.0) -> list[Record]:
        self._check_open()
        if max_records < 1:
            raise InvalidInput("max_records must be at least 1")
        batches = self._consumer.poll(timeout_ms=max(0, int(timeout_s * 1000)), max_records=max_records)
        records: list[Record] = []
        for ktp in sorted(batches):
            for message in batches[ktp]:
                records.append(
                    Record(
                        topic=message.topic,
                        partition=message.partition,
                        offset=message.offset,
                        key=message.key,
                        # Kafka allows null values (tombstones) and null header values; the
                        # interface has bytes for both.
                        value=message.value if message.value is not None else b"",
                        headers=tuple(
                            (name, header if header is not None else b"")
                            for name, header in (message.headers or ())
                        ),
                        timestamp_ms=message.timestamp if message.timestamp is not None else 0,
                    )
                )
        return records

    def commit(self, offsets: Mapping[TopicPartition, int] | None = None) -> None:
        self._check_open()
        if offsets is None:
            # kafka-python's default: the position after the last poll, per assigned partition.
            self._consumer.commit(timeout_ms=self._commit_timeout_ms)
            return
        to_commit = {}
        for tp, offset in offsets.items():
            if offset < 0:
                raise InvalidInput(f"cannot commit a negative offset ({offset}) for {tp}")
            # kafka-python 3: OffsetAndMetadata(offset, metadata, leader_epoch); -1 = unknown epoch.
            to_commit[_to_kafka_tp(tp)] = OffsetAndMetadata(offset, "", -1)
        if to_commit:
            self._consumer.commit(offsets=to_commit, timeout_ms=self._commit_timeout_ms)

    def committed(self, tp: TopicPartition) -> int | None:
        self._check_open()
        offset = self._consumer.committed(_to_kafka_tp(tp), timeout_ms=self._timeout_ms)
        return None if offset is None or offset < 0 else int(offset)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        """Next poll of tp starts at offset; for a partition not (yet) assigned, applies when it is."""
        self._check_open()
        tp = _to_tp(tp)
        if tp.topic not in self.topics:
            raise InvalidInput(f"cannot seek {tp}: this consumer does not subscribe to {tp.topic!r}")
        if offset < 0:
            raise InvalidInput(f"cannot seek to a negative offset ({offset})")
        with self._seek_lock:
            if _to_kafka_tp(tp) in self._consumer.assignment():
                self._pending_seeks.pop(tp, None)
                self._consumer.seek(_to_kafka_tp(tp), offset)
            else:
                self._pending_seeks[tp] = offset

    def assignment(self) -> set[TopicPartition]:
        if self._closed:
            return set()
        return {_to_tp(ktp) for ktp in self._consumer.assignment()}

    def end_offsets(self, tps: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        self._check_open()
        if not tps:
            return {}
        # kafka-python would wait for the full timeout on a partition that does not exist;
        # check metadata first so that is a prompt NotFound, as on the embedded backend.
        for topic in {tp[0] for tp in tps}:
            known = self._consumer.partitions_for_topic(topic) or set()
            missing = [tp for tp in tps if tp[0] == topic and tp[1] not in known]
            if missing:
                raise NotFound(f"no partition {missing[0][1]} in topic {topic!r}")
        # Short: the worker reads end offsets between batches (lag, and whether the cluster is
        # reachable), and must get back to its loop (checkpoints) while the cluster is down.
        offsets = self._consumer.end_offsets(
            [_to_kafka_tp(tp) for tp in tps], timeout_ms=min(self._timeout_ms, 2000)
        )
        return {_to_tp(ktp): int(offset) for ktp, offset in offsets.items()}

    def close(self) -> None:
        """Leave the group at once, so the partitions move without waiting for the session timeout."""
        if self._closed:
            return
        self._closed = True
        with self._seek_lock:
            self._pending_seeks.clear()
        # autocommit=False: committing is the application's decision (after processing).
        self._consumer.close(autocommit=False)
