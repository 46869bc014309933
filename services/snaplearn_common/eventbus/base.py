"""The event bus interface, designed for Kafka's semantics.

- A topic has a fixed number of partitions; a record's partition is chosen from its key
  with Kafka's murmur2 partitioner, so the same user always lands on the same partition
  on every backend (ordering per user).
- Offsets are per partition, start at 0, and increase by 1 per record.
- Delivery is at-least-once: a consumer reads from its group's committed offset;
  `commit` stores the *next* offset to read (Kafka's convention).
- A consumer group spreads a topic's partitions over its live members.
- Producing is synchronous: `Producer.send_batch` returns once its records are durable.

All calls are blocking (sqlite, kafka-python); async callers run them in a thread.
Records, headers and topic partitions are defined in snaplearn_common.records.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Self

from snaplearn_common.records import Headers, ProducerRecord, Record, TopicPartition

__all__ = [
    "Consumer",
    "DeliveryFailed",
    "EventBus",
    "Headers",
    "Producer",
    "ProducerRecord",
    "Record",
    "TopicPartition",
    "murmur2",
    "partition_for_key",
]


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
    """Raised by `Producer.send_batch` (and `flush`): some records of the batch are not durable.

    failed: their indices in the batch (for `flush`: in send order since the previous flush);
    permanent: the subset the bus rejected for good (too large, not authorised), which
    sending again cannot fix. Every other record of the batch is durable, and the producer
    keeps none of the failed ones: sending them again is the caller's decision.
    """

    def __init__(self, message: str, failed: Sequence[int], permanent: Sequence[int] = ()) -> None:
        super().__init__(message)
        self.failed = tuple(failed)
        self.permanent = tuple(permanent)


class Producer(ABC):
    """Appends records. `send_batch` is the one way records reach the bus: synchronous, in order.

    send_batch(records, timeout_s) returns once every record is durable (embedded: committed;
    Kafka: acknowledged by the in-sync replicas) or raises DeliveryFailed naming the ones that
    are not. No producer buffers or lingers on its own: batching is the caller's business
    (the EventPublisher's buffer, for the servers).

    send/flush serve callers that write a few records at a time: `send` checks the topic and
    queues the record in this object (from any thread, in call order); `flush` hands the
    queue to send_batch as one batch; `close` flushes what is queued. Thread-safe.
    """

    def __init__(self) -> None:
        self._queue_lock = threading.Lock()
        self._queue: list[ProducerRecord] = []

    @abstractmethod
    def send_batch(self, records: Sequence[ProducerRecord], timeout_s: float | None = None) -> None:
        """Write `records` in order; DeliveryFailed for those not durable when it returns."""

    def check_topic(self, topic: str) -> None:  # noqa: B027  (optional hook)
        """Raise NotFound for a topic this producer cannot send to (called by `send`)."""

    def send(self, topic: str, value: bytes, key: bytes | None = None, headers: Headers = ()) -> None:
        """Queue one record for the next `flush` (a bad topic or type fails here, not at flush)."""
        record = ProducerRecord.of(topic, value, key, headers)
        self.check_topic(topic)
        with self._queue_lock:
            self._queue.append(record)

    def flush(self, timeout_s: float | None = None) -> None:
        """Send everything queued by `send` as one batch (see send_batch)."""
        with self._queue_lock:
            batch, self._queue = self._queue, []
        if not batch:
            return
        try:
            self.send_batch(batch, timeout_s)
        except DeliveryFailed:
            raise
        except Exception as exc:
            # The queue is gone either way: say which records the caller must send again.
            raise DeliveryFailed(f"{type(exc).__name__}: {exc}", range(len(batch))) from exc

    @abstractmethod
    def close(self) -> None:
        """Flush what `send` queued, then release the connection."""

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
    def consumer(self, group_id: str, topics: Sequence[str], *, instance_id: str | None = None) -> Consumer:
        """A member of group_id. instance_id: a stable name for this member across restarts
        (Kafka's static membership, group.instance.id): a restarted member under the same
        name takes its partitions back without waiting out the crashed one's session."""

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
