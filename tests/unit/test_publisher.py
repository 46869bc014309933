"""EventPublisher over a real embedded bus: non-blocking, bounded, retrying, spooling, flushed on stop.

Backend trouble is made with small SqliteProducer subclasses (a stalled batch, failing
batches, an outage that times out or refuses batches the way Kafka's producer does);
everything else is the real SQLite bus and a real DiskSpool in tmp_path.
"""

from __future__ import annotations

import logging
import re
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from snaplearn_common.eventbus.base import DeliveryFailed, ProducerRecord, Record
from snaplearn_common.eventbus.publisher import EventPublisher, decode_spooled, encode_spooled
from snaplearn_common.eventbus.spool import DiskSpool
from snaplearn_common.eventbus.sqlite import SqliteEventBus, SqliteProducer
from snaplearn_common.events import (
    IMAGE_CLASSIFIED_TOPIC,
    EncodedEvent,
    decode_image_classified,
    encode_image_classified,
)
from tests.contract.eventbus_contract import poll_until, unique

TOPIC = IMAGE_CLASSIFIED_TOPIC


def event(i: int, user: str = "student-1") -> EncodedEvent:
    return encode_image_classified(
        event_id=f"event-{i}",
        user_id=user,
        time_s=1_700_000_000.0 + i,
        model_name="worksheet-cnn",
        model_version="3",
        labels=[("fractions", 0.9), ("decimals", 0.1)],
    )


class StalledProducer(SqliteProducer):
    """A backend that hangs in send_batch until `gate` opens."""

    def __init__(self, bus: SqliteEventBus, gate: threading.Event) -> None:
        super().__init__(bus)
        self.gate = gate

    def send_batch(self, records: Sequence[ProducerRecord], timeout_s: float | None = None) -> None:
        assert self.gate.wait(30), "test never opened the gate"
        super().send_batch(records, timeout_s)


class FlakyProducer(SqliteProducer):
    """A backend whose first batches fail, with an error that quotes the payload: first
    `send_failures` batches (a write error), then `flush_failures` more (a lock timeout)."""

    def __init__(self, bus: SqliteEventBus, send_failures: int = 0, flush_failures: int = 0) -> None:
        super().__init__(bus)
        self.send_failures = send_failures
        self.flush_failures = flush_failures

    def send_batch(self, records: Sequence[ProducerRecord], timeout_s: float | None = None) -> None:
        if self.send_failures > 0:
            self.send_failures -= 1
            raise sqlite3.OperationalError(f"disk I/O error while writing {records[0].value!r}")
        if self.flush_failures > 0:
            self.flush_failures -= 1
            raise sqlite3.OperationalError("database is locked")
        super().send_batch(records, timeout_s)


class OutageProducer(SqliteProducer):
    """A backend that can be down, like a Kafka producer whose broker is unreachable.

    While `down` is set, a batch is held until its timeout and then abandoned with
    DeliveryFailed (as the Kafka producer abandons a batch that was not acknowledged in
    time); with `expire=True` it fails at once (the cluster refuses it). Nothing is held
    after send_batch returns: `held` stays empty.
    """

    def __init__(self, bus: SqliteEventBus, expire: bool = False) -> None:
        super().__init__(bus)
        self.down = threading.Event()
        self.expire = expire
        self.held: list[ProducerRecord] = []
        self.sends = 0

    def send_batch(self, records: Sequence[ProducerRecord], timeout_s: float | None = None) -> None:
        self.sends += 1
        if self.down.is_set():
            if not self.expire:
                time.sleep(min(timeout_s or 0.01, 0.01))
            raise DeliveryFailed("broker unreachable", range(len(records)))
        super().send_batch(records, timeout_s)


class RejectingProducer(SqliteProducer):
    """Rejects, for good, every record whose value contains `poison` (like a too-large record)."""

    def __init__(self, bus: SqliteEventBus, poison: bytes) -> None:
        super().__init__(bus)
        self.poison = poison

    def send_batch(self, records: Sequence[ProducerRecord], timeout_s: float | None = None) -> None:
        rejected = [i for i, record in enumerate(records) if self.poison in record.value]
        super().send_batch([r for i, r in enumerate(records) if i not in rejected], timeout_s)
        if rejected:
            raise DeliveryFailed("record too large", rejected, rejected)


def wait_for(condition: object, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


@pytest.fixture
def bus(tmp_path: Path) -> Iterator[SqliteEventBus]:
    with SqliteEventBus(tmp_path / "bus.db") as bus:
        bus.create_topic(TOPIC, 2)
        yield bus


def read_all(bus: SqliteEventBus, count: int) -> list[bytes]:
    with bus.consumer(unique("reader"), [TOPIC]) as consumer:
        records = poll_until(consumer, count, deadline_s=10)
        assert consumer.poll(timeout_s=0.05) == [], "no duplicates"
    return [r.value for r in records]


def test_publish_never_blocks_while_the_backend_is_stalled(bus: SqliteEventBus) -> None:
    gate = threading.Event()
    producer = StalledProducer(bus, gate)
    publisher = EventPublisher(producer, max_buffered=1000)
    publisher.start()
    try:
        # The backend is stuck in send for as long as the gate is closed; if publish waited
        # on it, this loop would never finish.
        assert all(publisher.publish(TOPIC, event(i)) for i in range(100))
        assert publisher.buffered == 100
        assert publisher.published == 0
    finally:
        gate.set()
        publisher.stop()
        producer.close()
    assert (publisher.published, publisher.dropped, publisher.buffered) == (100, 0, 0)
    assert len(read_all(bus, 100)) == 100


def test_published_events_are_drained_to_the_bus_in_the_background(bus: SqliteEventBus) -> None:
    with bus.producer() as producer, EventPublisher(producer) as publisher:
        for i in range(50):
            publisher.publish(TOPIC, event(i, user=f"student-{i % 5}"))
        # No stop(), no flush: the drainer delivers on its own.
        with bus.consumer(unique("reader"), [TOPIC]) as consumer:
            records = poll_until(consumer, 50, deadline_s=10)
    decoded = [decode_image_classified(record) for record in records]
    assert sorted(message.event_id for message in decoded) == sorted(f"event-{i}" for i in range(50))
    # Keyed by user: each student's events stay in order on one partition.
    for user in (f"student-{u}" for u in range(5)):
        ids = [int(m.event_id.split("-")[1]) for m in decoded if m.user_id == user]
        assert ids == sorted(ids)


class CountingProducer(SqliteProducer):
    """The real producer, counting the batches the publisher sends (one transaction each)."""

    def __init__(self, bus: SqliteEventBus) -> None:
        super().__init__(bus)
        self.flushes = 0

    def send_batch(self, records: Sequence[ProducerRecord], timeout_s: float | None = None) -> None:
        self.flushes += 1
        super().send_batch(records, timeout_s)


def test_events_published_within_the_linger_leave_in_one_flush(bus: SqliteEventBus) -> None:
    producer = CountingProducer(bus)
    # A linger far longer than the test: only stop() (or a full batch) can end it.
    publisher = EventPublisher(producer, linger_s=60.0)
    publisher.start()
    try:
        for i in range(20):
            assert publisher.publish(TOPIC, event(i))
        assert publisher.published == 0  # still lingering
        publisher.stop()
        assert (publisher.published, producer.flushes) == (20, 1)
    finally:
        publisher.stop()
        producer.close()
    assert read_all(bus, 20) == [event(i).value for i in range(20)]  # one user: one partition, in order


def test_a_full_batch_does_not_wait_for_the_linger(bus: SqliteEventBus) -> None:
    producer = CountingProducer(bus)
    publisher = EventPublisher(producer, linger_s=60.0, max_batch=5)
    publisher.start()
    try:
        for i in range(5):
            publisher.publish(TOPIC, event(i))
        deadline = time.monotonic() + 10  # far within the 60 s linger
        while publisher.published < 5 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert (publisher.published, producer.flushes) == (5, 1)
    finally:
        publisher.stop()
        producer.close()


def test_overflow_is_counted_as_dropped_without_raising(bus: SqliteEventBus) -> None:
    with bus.producer() as producer:
        publisher = EventPublisher(producer, max_buffered=10)
        # Not started yet, so nothing drains: the buffer fills deterministically.
        accepted = [publisher.publish(TOPIC, event(i)) for i in range(15)]
        assert accepted == [True] * 10 + [False] * 5
        assert (publisher.buffered, publisher.dropped) == (10, 5)
        publisher.start()
        publisher.stop()
        assert publisher.publish(TOPIC, event(99)) is False  # after stop: dropped, not raised
    assert (publisher.published, publisher.dropped, publisher.buffered) == (10, 6, 0)
    assert len(read_all(bus, 10)) == 10


def test_backend_failures_are_retried_then_delivered_once_in_order(bus: SqliteEventBus) -> None:
    producer = FlakyProducer(bus, send_failures=3, flush_failures=2)
    publisher = EventPublisher(producer, retry_initial_backoff_s=0.001, retry_max_backoff_s=0.01)
    with producer, publisher:
        for i in range(5):
            publisher.publish(TOPIC, event(i))
    assert publisher.retried == 5
    assert (publisher.published, publisher.dropped) == (5, 0)
    values = read_all(bus, 5)
    assert values == [event(i).value for i in range(5)]  # one user: one partition, in order


def test_stop_flushes_everything(tmp_path: Path) -> None:
    # stop() must deliver what is still buffered, not only what the drainer already sent.
    with SqliteEventBus(tmp_path / "bus.db") as bus:
        bus.create_topic(TOPIC, 2)
        with bus.producer() as producer:
            publisher = EventPublisher(producer)
            publisher.start()
            for i in range(200):
                publisher.publish(TOPIC, event(i, user=f"student-{i % 7}"))
            publisher.stop(timeout_s=10)
            assert (publisher.published, publisher.buffered) == (200, 0)
            assert len(read_all(bus, 200)) == 200  # readable before the producer closes


def test_stop_gives_up_on_a_dead_backend_and_counts_the_loss(bus: SqliteEventBus) -> None:
    producer = FlakyProducer(bus, send_failures=10**9)
    publisher = EventPublisher(producer, retry_initial_backoff_s=0.001, retry_max_backoff_s=0.01)
    publisher.start()
    for i in range(3):
        publisher.publish(TOPIC, event(i))
    publisher.stop(timeout_s=0.2)  # returns although nothing could be delivered
    assert (publisher.published, publisher.dropped, publisher.buffered) == (0, 3, 0)
    assert publisher.retried > 0
    producer.close()


def test_metrics_are_registered(bus: SqliteEventBus) -> None:
    registry = CollectorRegistry()
    with bus.producer() as producer:
        publisher = EventPublisher(producer, max_buffered=3, registry=registry)
        for i in range(4):
            publisher.publish(TOPIC, event(i))
        assert registry.get_sample_value("snaplearn_eventbus_publisher_buffered") == 3
        publisher.start()
        publisher.stop()
    assert registry.get_sample_value("snaplearn_eventbus_publisher_published_total") == 3
    assert registry.get_sample_value("snaplearn_eventbus_publisher_dropped_total") == 1
    assert registry.get_sample_value("snaplearn_eventbus_publisher_retried_total") == 0
    assert registry.get_sample_value("snaplearn_eventbus_publisher_buffered") == 0


async def test_async_context_manager_publishes_from_the_event_loop(bus: SqliteEventBus) -> None:
    with bus.producer() as producer:
        async with EventPublisher(producer) as publisher:
            for i in range(20):
                assert publisher.publish(TOPIC, event(i))  # plain call, on the loop thread
        assert publisher.published == 20
    assert len(read_all(bus, 20)) == 20


def test_payloads_are_never_logged(bus: SqliteEventBus, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    secret = event(1, user="alice-secret-student")
    producer = FlakyProducer(bus, send_failures=2)
    publisher = EventPublisher(producer, max_buffered=1, retry_initial_backoff_s=0.001)
    publisher.publish(TOPIC, secret)
    publisher.publish(TOPIC, secret)  # overflow
    publisher.start()
    publisher.stop()
    producer.close()
    assert publisher.retried == 2 and publisher.dropped == 1 and publisher.published == 1
    assert caplog.records, "retries and drops are logged"
    assert "alice-secret-student" not in caplog.text
    assert "worksheet-cnn" not in caplog.text


def fast(producer: SqliteProducer, **kwargs: object) -> EventPublisher:
    return EventPublisher(
        producer,
        flush_timeout_s=0.02,
        retry_initial_backoff_s=0.001,
        retry_max_backoff_s=0.02,
        **kwargs,  # type: ignore[arg-type]
    )


def test_spooled_record_round_trips() -> None:
    original = event(7, user="student-7")
    assert decode_spooled(encode_spooled(TOPIC, original)) == (TOPIC, original)


@pytest.mark.parametrize("expire", [False, True], ids=["producer-holds", "producer-gives-up"])
def test_outage_spools_then_replays_everything_once_in_order(
    bus: SqliteEventBus, tmp_path: Path, expire: bool
) -> None:
    producer = OutageProducer(bus, expire=expire)
    spool = DiskSpool(tmp_path / "spool")
    publisher = fast(producer, spool=spool)
    with producer, publisher:
        publisher.publish(TOPIC, event(0))
        wait_for(lambda: publisher.published == 1)
        producer.down.set()
        for i in range(1, 120):
            assert publisher.publish(TOPIC, event(i, user=f"student-{i % 3}"))
        wait_for(lambda: publisher.buffered == 0)  # all of it moved to the spool, none confirmed
        assert publisher.published == 1 and publisher.spool_pending == 119
        assert not publisher.healthy and publisher.retried > 0
        producer.down.clear()
        # The spool acknowledges a replayed batch just after it counts as published.
        wait_for(lambda: publisher.published == 120 and publisher.healthy)
        for i in range(120, 130):  # healthy again: the direct path
            publisher.publish(TOPIC, event(i, user=f"student-{i % 3}"))
    spool.close()
    assert (publisher.published, publisher.dropped, publisher.spool_pending) == (130, 0, 0)
    assert publisher.spooled >= 119
    decoded = [decode_image_classified(r) for r in read_records(bus, 130)]
    assert sorted(int(m.event_id.split("-")[1]) for m in decoded) == list(range(130))
    for user in {m.user_id for m in decoded}:  # per user (= partition): publish order
        ids = [int(m.event_id.split("-")[1]) for m in decoded if m.user_id == user]
        assert ids == sorted(ids)


def test_an_outage_is_logged_once_at_each_end_and_counted(
    bus: SqliteEventBus, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    producer = OutageProducer(bus, expire=True)
    registry = CollectorRegistry()
    publisher = fast(producer, spool=DiskSpool(tmp_path / "spool"), registry=registry, metric_prefix="p")
    with producer, publisher:
        for outage in range(2):
            producer.down.set()
            before = producer.sends
            for i in range(40):
                publisher.publish(TOPIC, event(outage * 100 + i))
            wait_for(lambda b=before: producer.sends > b + 20)  # many failed attempts, with backoff
            producer.down.clear()
            wait_for(lambda: publisher.healthy and publisher.buffered == 0)
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    starts = [line for line in lines if "event bus unreachable" in line]
    ends = [line for line in lines if "reachable again after" in line]
    assert len(starts) == 2 and len(ends) == 2, lines  # one of each per outage, not one per attempt
    assert len(lines) == 4, lines
    assert re.search(r"after \d+\.\d s; 40 event\(s\) spooled during the outage", ends[0]), ends[0]
    assert publisher.outages == 2 and registry.get_sample_value("p_outages_total") == 2


def test_the_spool_outlives_the_process_and_replays_before_newer_events(
    bus: SqliteEventBus, tmp_path: Path
) -> None:
    producer = OutageProducer(bus, expire=True)
    producer.down.set()
    spool = DiskSpool(tmp_path / "spool")
    publisher = fast(producer, spool=spool)
    publisher.start()
    for i in range(50):
        publisher.publish(TOPIC, event(i))
    publisher.stop(timeout_s=0.2)  # the broker never came back
    producer.held.clear()  # the process ends: what the producer held in memory is gone
    producer.down.clear()
    producer.close()
    spool.close()
    assert (publisher.published, publisher.dropped) == (0, 0), "kept in the spool, not dropped"

    with bus.producer() as healthy:  # the next run of the process
        respool = DiskSpool(tmp_path / "spool")
        assert respool.pending == 50
        with fast(healthy, spool=respool) as again:
            for i in range(50, 60):
                again.publish(TOPIC, event(i))
        respool.close()
    assert (again.published, again.dropped) == (60, 0)
    values = [r.value for r in read_records(bus, 60)]
    assert values == [event(i).value for i in range(60)]  # one user: old events first, in order


def test_permanently_rejected_records_are_dropped_and_the_rest_delivered(bus: SqliteEventBus) -> None:
    poison = encode_image_classified(
        "event-poison", "student-1", 1.0, "poison-model", "1", [("fractions", 1.0)]
    )
    producer = RejectingProducer(bus, b"poison-model")
    publisher = fast(producer)
    with producer, publisher:
        publisher.publish(TOPIC, event(0))
        publisher.publish(TOPIC, poison)
        publisher.publish(TOPIC, event(1))
    assert (publisher.published, publisher.dropped) == (2, 1)
    assert [r.value for r in read_records(bus, 2)] == [event(0).value, event(1).value]


def read_records(bus: SqliteEventBus, count: int) -> list[Record]:
    with bus.consumer(unique("reader"), [TOPIC]) as consumer:
        records = poll_until(consumer, count, deadline_s=10)
        assert consumer.poll(timeout_s=0.05) == [], "no duplicates"
    return records
