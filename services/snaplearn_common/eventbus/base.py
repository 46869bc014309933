"""The event bus interface, designed for Kafka's semantics.

- A topic has a fixed number of partitions; a record's partition is chosen from its key
  with Kafka's murmur2 partitioner, so the same user always lands on the same partition
  on every backend (ordering per user).
- Offsets are per partition, start at 0, and increase by 1 per record.
- Delivery is at-least-once: a consumer reads from its group's committed offset;
  `commit` stores the *next* offset to read (Kafka's convention).
- A consumer group spreads a topic's partitions over its live members.

All calls are blocking (sqlite, kafka-python); async callers run them in a thread.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Self

Headers = tuple[tuple[str, bytes], ...]


class TopicPartition(NamedTuple):
    topic: str
    partition: int


@dataclass(frozen=True, slots=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: Headers = field(default=())
    timestamp_ms: int = 0

    @property
    def topic_partition(self) -> TopicPartition:
        return TopicPartition(self.topic, self.partition)

    def header(self, name: str) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 (org.apache.kafka.common.utils.Utils.murmur2), as a signed 32-bit int."""
    length = len(data)
    seed, m, r = 0x9747B28C, 0x5BD1E995, 24
    h = (seed ^ length) & 0xFFFFFFFF
    for i in range(0, length - length % 4, 4):
        k = int.from_bytes(data[i : i + 4], "little")
        k = (k * m) & 0xFFFFFFFF
        k ^= k >> r
        k = (k * m) & 0xFFFFFFFF
        h = (h * m) & 0xFFFFFFFF
        h ^= k
    tail = length % 4
    base = length - tail
    if tail == 3:
        h ^= data[base + 2] << 16
    if tail >= 2:
        h ^= data[base + 1] << 8
    if tail >= 1:
        h ^= data[base]
        h = (h * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    h ^= h >> 15
    return h - (1 << 32) if h & 0x80000000 else h


def partition_for_key(key: bytes, partitions: int) -> int:
    """Kafka's default partitioner for keyed records: toPositive(murmur2(key)) % partitions."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


class DeliveryFailed(Exception):
    """Raised by `Producer.flush`: the producer gave up on some records sent since the last flush.

    failed: their indices in send order, counted from the first send after the previous
    flush that returned or raised DeliveryFailed (exact when one thread sends and flushes);
    permanent: the subset the bus rejected for good (too large, not authorised), which
    sending again cannot fix. Every other record of that span is durable.
    """

    def __init__(self, message: str, failed: Sequence[int], permanent: Sequence[int] = ()) -> None:
        super().__init__(message)
        self.failed = tuple(failed)
        self.permanent = tuple(permanent)


class Producer(ABC):
    """Appends records. `send` may buffer; `flush` returns once everything sent is durable.

    When `flush` raises: TimeoutError (timeout_s passed) or any error other than
    DeliveryFailed means the records not yet durable are still held and retried by the
    producer (flush again to wait for them); DeliveryFailed names the records it dropped.
    """

    @abstractmethod
    def send(self, topic: str, value: bytes, key: bytes | None = None, headers: Headers = ()) -> None: ...

    @abstractmethod
    def flush(self, timeout_s: float | None = None) -> None: ...

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Consumer(ABC):
    """Reads the partitions assigned to it within a consumer group."""

    @abstractmethod
    def poll(self, max_records: int = 500, timeout_s: float = 1.0) -> list[Record]:
        """Up to max_records records in offset order per partition; [] after timeout_s."""

    @abstractmethod
    def commit(self, offsets: Mapping[TopicPartition, int] | None = None) -> None:
        """Store next-offset-to-read per partition; None commits the position after the last poll."""

    @abstractmethod
    def committed(self, tp: TopicPartition) -> int | None: ...

    @abstractmethod
    def seek(self, tp: TopicPartition, offset: int) -> None:
        """Make the next poll of tp start at offset (used to resume from a model checkpoint)."""

    @abstractmethod
    def assignment(self) -> set[TopicPartition]: ...

    @abstractmethod
    def end_offsets(self, tps: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        """Offset that the next record appended to each partition will get (for lag)."""

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EventBus(ABC):
    """A factory for producers and consumers over one cluster (or one embedded log)."""

    @abstractmethod
    def create_topic(self, topic: str, partitions: int) -> None:
        """Create the topic if absent (idempotent); an existing topic keeps its partitions."""

    @abstractmethod
    def partitions_for(self, topic: str) -> int: ...

    @abstractmethod
    def producer(self) -> Producer: ...

    @abstractmethod
    def consumer(self, group_id: str, topics: Sequence[str]) -> Consumer: ...

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
