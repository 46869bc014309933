"""The event bus contract: one suite every backend must pass.

Subclass `EventBusContract` in a `Test...` class and implement `make_bus(tmp_path)`:

    class TestSqliteEventBus(EventBusContract):
        def make_bus(self, tmp_path: Path) -> EventBus:
            return SqliteEventBus(tmp_path / "bus.db")

The tests only use the public interface (base.py) and assume nothing that a real Kafka
breaks: every test uses fresh topic/group names, waits for records with poll loops under
a generous deadline (group joins and rebalances take seconds on Kafka), and never sleeps
to synchronise. On the embedded bus each test finishes well under a second.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from snaplearn_common.eventbus.base import Consumer, EventBus, Record, TopicPartition, partition_for_key

# How long to wait for records / assignments before failing; Kafka needs seconds to
# form a group, the embedded bus milliseconds.
DEADLINE_S = 30.0
POLL_S = 0.1


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def poll_until(
    consumer: Consumer, count: int, deadline_s: float = DEADLINE_S, max_records: int = 500
) -> list[Record]:
    """Poll until at least `count` records arrived (fails after deadline_s)."""
    records: list[Record] = []
    deadline = time.monotonic() + deadline_s
    while len(records) < count:
        assert time.monotonic() < deadline, f"got {len(records)} of {count} records before the deadline"
        records.extend(consumer.poll(max_records=max_records, timeout_s=POLL_S))
    return records


def poll_until_assigned(
    consumers: list[Consumer],
    done: Callable[[list[set[TopicPartition]]], bool],
    deadline_s: float = DEADLINE_S,
) -> list[Record]:
    """Poll every consumer in turn until `done(assignments)`; returns any records seen meanwhile."""
    records: list[Record] = []
    deadline = time.monotonic() + deadline_s
    while True:
        for consumer in consumers:
            records.extend(consumer.poll(timeout_s=POLL_S))
        assignments = [consumer.assignment() for consumer in consumers]
        if done(assignments):
            return records
        assert time.monotonic() < deadline, f"assignments never settled: {assignments}"


def by_partition(records: list[Record]) -> dict[int, list[Record]]:
    grouped: dict[int, list[Record]] = {}
    for record in records:
        grouped.setdefault(record.partition, []).append(record)
    return grouped


class EventBusContract:
    """Mixin: the behaviour base.py promises, for any backend."""

    def make_bus(self, tmp_path: Path) -> EventBus:
        raise NotImplementedError

    @pytest.fixture
    def bus(self, tmp_path: Path) -> Iterator[EventBus]:
        bus = self.make_bus(tmp_path)
        try:
            yield bus
        finally:
            bus.close()

    @pytest.fixture
    def topic(self) -> str:
        return unique("contract")

    # -- topics ------------------------------------------------------------------------

    def test_create_topic_is_idempotent_and_keeps_partitions(self, bus: EventBus, topic: str) -> None:
        bus.create_topic(topic, 3)
        bus.create_topic(topic, 3)
        bus.create_topic(topic, 5)  # an existing topic keeps its partition count
        assert bus.partitions_for(topic) == 3

    # -- producing ---------------------------------------------------------------------

    def test_keyed_records_land_on_partition_for_key(self, bus: EventBus, topic: str) -> None:
        bus.create_topic(topic, 3)
        keys = [f"user-{i}".encode() for i in range(30)]
        with bus.producer() as producer:
            for key in keys:
                producer.send(topic, b"v:" + key, key=key)
            producer.flush()
        with bus.consumer(unique("g"), [topic]) as consumer:
            records = poll_until(consumer, len(keys))
        assert sorted(r.key for r in records if r.key is not None) == sorted(keys)
        for record in records:
            assert record.key is not None
            assert record.partition == partition_for_key(record.key, 3)
            assert record.value == b"v:" + record.key

    def test_offsets_contiguous_from_zero_and_order_preserved_per_partition(
        self, bus: EventBus, topic: str
    ) -> None:
        bus.create_topic(topic, 2)
        sent: dict[int, list[bytes]] = {0: [], 1: []}
        with bus.producer() as producer:
            for i in range(60):
                key = f"k{i % 7}".encode()
                value = f"{i}".encode()
                producer.send(topic, value, key=key)
                sent[partition_for_key(key, 2)].append(value)
            producer.flush()
        with bus.consumer(unique("g"), [topic]) as consumer:
            records = poll_until(consumer, 60)
        assert len(records) == 60
        for partition, in_partition in by_partition(records).items():
            assert [r.offset for r in in_partition] == list(range(len(in_partition)))
            assert [r.value for r in in_partition] == sent[partition]
            assert all(r.topic == topic for r in in_partition)

    def test_poll_returns_records_sent_after_flush(self, bus: EventBus, topic: str) -> None:
        bus.create_topic(topic, 1)
        with bus.consumer(unique("g"), [topic]) as consumer, bus.producer() as producer:
            poll_until_assigned([consumer], lambda a: a[0] == {TopicPartition(topic, 0)})
            producer.send(topic, b"first", key=b"k")
            producer.flush()
            records = poll_until(consumer, 1)
            assert [(r.offset, r.value) for r in records] == [(0, b"first")]
            producer.send(topic, b"second", key=b"k")
            producer.flush()
            records = poll_until(consumer, 1)
            assert [(r.offset, r.value) for r in records] == [(1, b"second")]

    def test_end_offsets(self, bus: EventBus, topic: str) -> None:
        bus.create_topic(topic, 3)
        keys = [f"user-{i}".encode() for i in range(25)]
        with bus.producer() as producer:
            for key in keys:
                producer.send(topic, b"x", key=key)
            producer.flush()
        expected = {TopicPartition(topic, p): 0 for p in range(3)}
        for key in keys:
            expected[TopicPartition(topic, partition_for_key(key, 3))] += 1
        with bus.consumer(unique("g"), [topic]) as consumer:
            assert consumer.end_offsets(list(expected)) == expected

    # -- consuming and committing ------------------------------------------------------

    def test_commit_then_new_consumer_of_group_resumes_from_committed(
        self, bus: EventBus, topic: str
    ) -> None:
        bus.create_topic(topic, 1)
        tp = TopicPartition(topic, 0)
        group = unique("g")
        with bus.producer() as producer:
            for i in range(10):
                producer.send(topic, f"{i}".encode(), key=b"k")
            producer.flush()
        with bus.consumer(group, [topic]) as first:
            assert first.committed(tp) is None
            assert len(poll_until(first, 10)) == 10
            # Only the first four are processed and committed; the rest is in flight when it stops.
            first.commit({tp: 4})
            assert first.committed(tp) == 4
        with bus.consumer(group, [topic]) as second:
            assert second.committed(tp) == 4
            records = poll_until(second, 6)
            # At-least-once: the six uncommitted records are delivered again.
            assert [r.offset for r in records] == list(range(4, 10))
            second.commit()  # the position after the last poll
            assert second.committed(tp) == 10
        with bus.consumer(group, [topic]) as third:
            assert poll_until_assigned([third], lambda a: a[0] == {tp}) == []
            assert third.poll(timeout_s=POLL_S) == []

    def test_separate_groups_each_see_everything(self, bus: EventBus, topic: str) -> None:
        bus.create_topic(topic, 2)
        with bus.producer() as producer:
            for i in range(20):
                producer.send(topic, f"{i}".encode(), key=f"k{i}".encode())
            producer.flush()
        seen = []
        for _ in range(2):
            with bus.consumer(unique("g"), [topic]) as consumer:
                records = poll_until(consumer, 20)
                consumer.commit()
            seen.append(sorted(r.value for r in records))
        assert seen[0] == seen[1] == sorted(f"{i}".encode() for i in range(20))

    def test_seek_rewinds_and_skips(self, bus: EventBus, topic: str) -> None:
        bus.create_topic(topic, 1)
        tp = TopicPartition(topic, 0)
        with bus.producer() as producer:
            for i in range(10):
                producer.send(topic, f"{i}".encode(), key=b"k")
            producer.flush()
        with bus.consumer(unique("g"), [topic]) as consumer:
            assert len(poll_until(consumer, 10)) == 10
            consumer.seek(tp, 3)
            assert [r.offset for r in poll_until(consumer, 7)] == list(range(3, 10))
            consumer.seek(tp, 8)
            assert [r.value for r in poll_until(consumer, 2)] == [b"8", b"9"]

    def test_two_consumers_of_one_group_split_partitions(self, bus: EventBus, topic: str) -> None:
        partitions = 4
        bus.create_topic(topic, partitions)
        everything = {TopicPartition(topic, p) for p in range(partitions)}
        group = unique("g")
        with bus.consumer(group, [topic]) as first, bus.consumer(group, [topic]) as second:

            def split(assignments: list[set[TopicPartition]]) -> bool:
                a, b = assignments
                return bool(a) and bool(b) and not (a & b) and a | b == everything

            poll_until_assigned([first, second], split)
            keys = [f"user-{i}".encode() for i in range(80)]
            with bus.producer() as producer:
                for key in keys:
                    producer.send(topic, key, key=key)
                producer.flush()
            seen: dict[int, list[Record]] = {0: [], 1: []}
            deadline = time.monotonic() + DEADLINE_S
            while len(seen[0]) + len(seen[1]) < len(keys):
                assert time.monotonic() < deadline, "records did not all arrive"
                for index, consumer in enumerate((first, second)):
                    seen[index].extend(consumer.poll(timeout_s=POLL_S))
            for index, consumer in enumerate((first, second)):
                assert seen[index], "each member of the group gets a share"
                assert {r.topic_partition for r in seen[index]} <= consumer.assignment()
            positions = [{(r.partition, r.offset) for r in seen[i]} for i in (0, 1)]
            assert not positions[0] & positions[1], "no record is delivered to both members"
            assert sorted(r.value for r in seen[0] + seen[1]) == sorted(keys)

    # -- record contents ---------------------------------------------------------------

    def test_keys_and_headers_round_trip_byte_exact(self, bus: EventBus, topic: str) -> None:
        bus.create_topic(topic, 1)
        headers = (
            ("event-type", b"snaplearn.events.v1.ImageClassified"),
            ("binary", bytes(range(256))),
            ("empty", b""),
            ("dup", b"1"),
            ("dup", b"2"),
            ("unicod\u00e9-\u6f22", b"\x00\xff\x00"),
        )
        with bus.producer() as producer:
            producer.send(topic, b"with headers", key=b"\x00key\xff", headers=headers)
            producer.send(topic, b"no key, no headers")
            producer.flush()
        with bus.consumer(unique("g"), [topic]) as consumer:
            first, second = poll_until(consumer, 2)
        assert first.key == b"\x00key\xff"
        assert first.headers == headers
        assert first.header("dup") == b"1"
        assert second.key is None
        assert second.headers == ()
        assert second.timestamp_ms > 0

    def test_binary_values_round_trip(self, bus: EventBus, topic: str) -> None:
        bus.create_topic(topic, 1)
        rng = random.Random(7)
        values = [
            bytes(range(256)),
            b"\x00" * 10,
            b"",
            rng.randbytes(100_000),
            "\u00e9\u6f22\U0001f600".encode(),
        ]
        with bus.producer() as producer:
            for value in values:
                producer.send(topic, value, key=b"k")
            producer.flush()
        with bus.consumer(unique("g"), [topic]) as consumer:
            records = poll_until(consumer, len(values))
        assert [r.value for r in records] == values
