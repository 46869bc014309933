"""The embedded (SQLite) event bus: the shared contract plus what only it promises.

Cross-process tests use multiprocessing's spawn context (fresh interpreters, as in
production where the vision server and the recommender are separate processes); the
child functions live at module level so that spawn can import them.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from multiprocessing.queues import Queue as MpQueue
from multiprocessing.synchronize import Event as MpEvent
from pathlib import Path

import pytest

from snaplearn_common.errors import NotFound
from snaplearn_common.eventbus.base import (
    EventBus,
    Headers,
    ProducerRecord,
    Record,
    TopicPartition,
    partition_for_key,
)
from snaplearn_common.eventbus.factory import open_bus
from snaplearn_common.eventbus.settings import BusSettings
from snaplearn_common.eventbus.sqlite import RetentionPolicy, SqliteEventBus, assign_round_robin
from tests.contract.eventbus_contract import EventBusContract, poll_until, poll_until_assigned, unique

SPAWN = multiprocessing.get_context("spawn")
CHILD_TIMEOUT_S = 60.0


class TestSqliteEventBusContract(EventBusContract):
    def make_bus(self, tmp_path: Path) -> EventBus:
        return SqliteEventBus(tmp_path / "bus.db")


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "bus.db"


# -- children for the cross-process tests (module level: spawn imports them) -----------


def produce_in_child(
    path: str, topic: str, writer: int, count: int, flush_every: int, start: MpEvent
) -> None:
    start.wait(CHILD_TIMEOUT_S)
    with SqliteEventBus(path) as bus, bus.producer() as producer:
        for seq in range(count):
            producer.send(topic, f"{writer}:{seq}".encode(), key=f"w{writer}-{seq % 5}".encode())
            if seq % flush_every == flush_every - 1:
                producer.flush()


def consume_in_child(
    path: str,
    topic: str,
    group: str,
    count: int,
    ready: MpEvent,
    results: MpQueue[list[tuple[int, int, bytes | None, bytes, Headers]]],
) -> None:
    with SqliteEventBus(path) as bus, bus.consumer(group, [topic]) as consumer:
        everything = {TopicPartition(topic, p) for p in range(bus.partitions_for(topic))}
        records = poll_until_assigned([consumer], lambda a: a[0] == everything)
        ready.set()
        records += poll_until(consumer, count - len(records))
        consumer.commit()
        results.put([(r.partition, r.offset, r.key, r.value, r.headers) for r in records])


# -- across processes ---------------------------------------------------------------------


def test_two_processes_append_concurrently_without_lost_or_duplicate_offsets(db_path: Path) -> None:
    topic = unique("concurrent")
    writers, per_writer = 2, 1500
    with SqliteEventBus(db_path) as bus:
        bus.create_topic(topic, 3)
    start = SPAWN.Event()
    children = [
        # flush every 7 records: hundreds of small transactions from each process, interleaved.
        SPAWN.Process(target=produce_in_child, args=(str(db_path), topic, writer, per_writer, 7, start))
        for writer in range(writers)
    ]
    for child in children:
        child.start()
    start.set()
    for child in children:
        child.join(CHILD_TIMEOUT_S)
        assert child.exitcode == 0
    with SqliteEventBus(db_path) as bus, bus.consumer(unique("g"), [topic]) as consumer:
        records = poll_until(consumer, writers * per_writer)
        assert consumer.poll(timeout_s=0.05) == []
        ends = consumer.end_offsets([TopicPartition(topic, p) for p in range(3)])
    values = [r.value for r in records]
    assert len(values) == len(set(values)) == writers * per_writer
    per_partition: dict[int, list[Record]] = {}
    for record in records:
        per_partition.setdefault(record.partition, []).append(record)
    for partition, in_partition in per_partition.items():
        assert [r.offset for r in in_partition] == list(range(len(in_partition)))
        assert ends[TopicPartition(topic, partition)] == len(in_partition)
        # Each writer's records keep their send order within the partition.
        for writer in range(writers):
            sequence = [
                int(r.value.split(b":")[1]) for r in in_partition if r.value.startswith(f"{writer}:".encode())
            ]
            assert sequence == sorted(sequence)


def test_consumer_in_another_process_sees_records(db_path: Path) -> None:
    topic = unique("cross")
    with SqliteEventBus(db_path) as bus:
        bus.create_topic(topic, 2)
        ready = SPAWN.Event()
        results: MpQueue[list[tuple[int, int, bytes | None, bytes, Headers]]] = SPAWN.Queue()
        child = SPAWN.Process(
            target=consume_in_child, args=(str(db_path), topic, "recommender", 50, ready, results)
        )
        child.start()
        try:
            assert ready.wait(CHILD_TIMEOUT_S), "child consumer never got its partitions"
            with bus.producer() as producer:
                for i in range(50):
                    producer.send(
                        topic,
                        f"event-{i}".encode(),
                        key=f"user-{i % 9}".encode(),
                        headers=(("n", b"%d" % i),),
                    )
            received = results.get(timeout=CHILD_TIMEOUT_S)
        finally:
            child.join(CHILD_TIMEOUT_S)
        assert child.exitcode == 0
        assert sorted(value for _, _, _, value, _ in received) == sorted(
            f"event-{i}".encode() for i in range(50)
        )
        for partition, _, key, value, headers in received:
            assert key is not None
            assert partition == partition_for_key(key, 2)
            assert headers == (("n", value.removeprefix(b"event-")),)
        with bus.consumer("recommender", [topic]) as consumer:
            assert consumer.committed(TopicPartition(topic, 0)) is not None  # the child's commit is shared


# -- durability -------------------------------------------------------------------------


def test_records_offsets_and_commits_survive_close_and_reopen(db_path: Path) -> None:
    topic, group = unique("durable"), unique("g")
    tp = TopicPartition(topic, 0)
    with SqliteEventBus(db_path) as bus:
        bus.create_topic(topic, 1)
        with bus.producer() as producer:
            for i in range(5):
                producer.send(topic, b"%d" % i)
        # close() flushed: nothing was flushed explicitly.
        with bus.consumer(group, [topic]) as consumer:
            poll_until(consumer, 5)
            consumer.commit({tp: 3})
    with SqliteEventBus(db_path) as bus:
        assert bus.partitions_for(topic) == 1
        with bus.producer() as producer:
            producer.send(topic, b"5")
        with bus.consumer(group, [topic]) as consumer:
            assert consumer.committed(tp) == 3
            assert [(r.offset, r.value) for r in poll_until(consumer, 3)] == [(3, b"3"), (4, b"4"), (5, b"5")]


# -- consumer groups --------------------------------------------------------------------


def test_assignment_is_round_robin_over_sorted_members() -> None:
    members = [("b", frozenset({"t"})), ("a", frozenset({"t", "u"}))]
    assignment = assign_round_robin(members, {"t": 3, "u": 1, "missing": 2})
    # Partitions in order, dealt to a, b, a, ...; u-0 skips b, which does not subscribe to u.
    assert assignment == {
        "a": {TopicPartition("t", 0), TopicPartition("t", 2), TopicPartition("u", 0)},
        "b": {TopicPartition("t", 1)},
    }


def test_expired_member_partitions_are_reassigned_and_its_commits_fenced(db_path: Path) -> None:
    topic, group = unique("expiry"), unique("g")
    partitions = 4
    everything = {TopicPartition(topic, p) for p in range(partitions)}
    with SqliteEventBus(db_path, session_timeout_s=0.5) as bus:
        bus.create_topic(topic, partitions)
        first, second = bus.consumer(group, [topic]), bus.consumer(group, [topic])

        def split(assignments: list[set[TopicPartition]]) -> bool:
            a, b = assignments
            return bool(a) and bool(b) and not (a & b) and a | b == everything

        poll_until_assigned([first, second], split)
        seconds_share = second.assignment()
        with bus.producer() as producer:
            for i in range(40):
                producer.send(topic, b"%d" % i, key=b"user-%d" % i)
        seen_by_second = poll_until(second, 1)
        first.commit()  # the first member's progress is committed, the second's is not
        # The second member stops polling (a hung or crashed process) ...
        redelivered: list[Record] = []
        deadline = time.monotonic() + 10
        while first.assignment() != everything:
            assert time.monotonic() < deadline, "the expired member was never evicted"
            redelivered += first.poll(timeout_s=0.02)
        redelivered += first.poll(timeout_s=0.05)
        # ... so its partitions move to the first, from the committed offset: at-least-once.
        redelivered_keys = {r.value for r in redelivered if r.topic_partition in seconds_share}
        assert {r.value for r in seen_by_second} <= redelivered_keys
        # The zombie's commit must not overwrite what the new owner commits.
        second.commit()
        for tp in seconds_share:
            assert second.committed(tp) is None
        # When it polls again it rejoins and gets a share back.
        poll_until_assigned([first, second], split)
        first.close()
        second.close()


def test_closed_member_hands_over_at_once(db_path: Path) -> None:
    topic, group = unique("leave"), unique("g")
    everything = {TopicPartition(topic, p) for p in range(2)}
    # A session timeout far longer than the test: the hand-over must come from close().
    with SqliteEventBus(db_path, session_timeout_s=60) as bus:
        bus.create_topic(topic, 2)
        first, second = bus.consumer(group, [topic]), bus.consumer(group, [topic])
        poll_until_assigned([first, second], lambda a: bool(a[0]) and bool(a[1]))
        second.close()
        poll_until_assigned([first], lambda a: a[0] == everything, deadline_s=5)
        first.close()


def test_latest_reset_skips_existing_records(db_path: Path) -> None:
    topic = unique("latest")
    with SqliteEventBus(db_path) as bus:
        bus.create_topic(topic, 1)
        with bus.producer() as producer:
            producer.send(topic, b"old")
        with bus.consumer(unique("g"), [topic], auto_offset_reset="latest") as consumer:
            poll_until_assigned([consumer], lambda a: bool(a[0]))
            with bus.producer() as producer:
                producer.send(topic, b"new")
            assert [r.value for r in poll_until(consumer, 1)] == [b"new"]


def test_seek_before_assignment_applies_when_assigned(db_path: Path) -> None:
    topic = unique("checkpoint")
    tp = TopicPartition(topic, 0)
    with SqliteEventBus(db_path) as bus:
        bus.create_topic(topic, 1)
        with bus.producer() as producer:
            for i in range(10):
                producer.send(topic, b"%d" % i)
        with bus.consumer(unique("g"), [topic]) as consumer:
            consumer.seek(tp, 7)  # resume from a model checkpoint, before the first poll
            assert [r.offset for r in poll_until(consumer, 3)] == [7, 8, 9]


def test_consumer_picks_up_a_topic_created_after_it_subscribed(db_path: Path) -> None:
    topic = unique("later")
    with (
        SqliteEventBus(db_path, auto_create_partitions=2) as bus,
        bus.consumer(unique("g"), [topic]) as consumer,
    ):
        assert consumer.poll(timeout_s=0.01) == []
        assert consumer.assignment() == set()
        with bus.producer() as producer:
            producer.send(topic, b"hello", key=b"k")  # auto-creates the topic with 2 partitions
        assert [r.value for r in poll_until(consumer, 1)] == [b"hello"]
        assert bus.partitions_for(topic) == 2


def test_unknown_topics_are_not_found_without_auto_creation(db_path: Path) -> None:
    with SqliteEventBus(db_path, auto_create_partitions=None) as bus:
        with pytest.raises(NotFound):
            bus.partitions_for("nope")
        with bus.producer() as producer, pytest.raises(NotFound):
            producer.send("nope", b"x")


# -- producing --------------------------------------------------------------------------


def test_producer_is_safe_from_many_threads(db_path: Path) -> None:
    topic = unique("threads")
    threads, per_thread = 4, 400
    with SqliteEventBus(db_path) as bus:
        bus.create_topic(topic, 4)
        with bus.producer() as producer:
            start = threading.Barrier(threads)

            def send_all(index: int) -> None:
                start.wait()
                for seq in range(per_thread):
                    producer.send(topic, f"{index}:{seq}".encode(), key=f"thread-{index}".encode())

            workers = [threading.Thread(target=send_all, args=(i,)) for i in range(threads)]
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join()
            producer.flush()
        with bus.consumer(unique("g"), [topic]) as consumer:
            records = poll_until(consumer, threads * per_thread)
    for index in range(threads):
        mine = [int(r.value.split(b":")[1]) for r in records if r.key == f"thread-{index}".encode()]
        assert mine == list(range(per_thread))  # one key, one partition: send order kept


def test_a_batch_is_durable_when_send_batch_returns(db_path: Path) -> None:
    # The producer neither buffers nor lingers: send_batch writes before it returns.
    topic = unique("linger")
    with SqliteEventBus(db_path) as bus:
        bus.create_topic(topic, 1)
        with bus.producer() as producer, bus.consumer(unique("g"), [topic]) as consumer:
            producer.send_batch([ProducerRecord(topic, b"no flush")])
            assert [r.value for r in poll_until(consumer, 1, deadline_s=5)] == [b"no flush"]


def test_poll_returns_promptly_when_records_arrive(db_path: Path) -> None:
    topic = unique("latency")
    with SqliteEventBus(db_path) as bus:
        bus.create_topic(topic, 1)
        with bus.consumer(unique("g"), [topic]) as consumer, bus.producer() as producer:
            poll_until_assigned([consumer], lambda a: bool(a[0]))

            def send_and_flush() -> None:
                producer.send(topic, b"x")
                producer.flush()

            sender = threading.Thread(target=send_and_flush)
            started = time.monotonic()
            sender.start()
            records = consumer.poll(timeout_s=10)
            elapsed = time.monotonic() - started
            sender.join()
            assert [r.value for r in records] == [b"x"]
            assert elapsed < 1.0  # typically 1-3 ms; generous for loaded CI machines


# -- retention --------------------------------------------------------------------------


def test_retention_by_count_waits_for_the_slowest_group(db_path: Path) -> None:
    topic = unique("retention")
    tp = TopicPartition(topic, 0)
    with SqliteEventBus(db_path, retention=RetentionPolicy(max_records_per_partition=5)) as bus:
        bus.create_topic(topic, 1)
        with bus.producer() as producer:
            for i in range(20):
                producer.send(topic, b"%d" % i)
        with bus.consumer("fast", [topic]) as fast, bus.consumer("slow", [topic]) as slow:
            poll_until(fast, 20)
            fast.commit()
            slow.commit({tp: 12})
            # Records 0..14 are beyond the newest 5, but the slow group still needs 12..14.
            assert bus.enforce_retention() == 12
            slow.commit({tp: 20})
            assert bus.enforce_retention() == 3
            assert bus.enforce_retention() == 0
        with bus.consumer(unique("new"), [topic]) as newcomer:
            assert [r.offset for r in poll_until(newcomer, 5)] == list(range(15, 20))
            assert newcomer.end_offsets([tp]) == {tp: 20}


def test_retention_by_age_keeps_offsets_monotonic(db_path: Path) -> None:
    topic = unique("aged")
    tp = TopicPartition(topic, 0)
    with SqliteEventBus(db_path, retention=RetentionPolicy(max_age_ms=60_000)) as bus:
        bus.create_topic(topic, 1)
        with bus.producer() as producer:
            for i in range(5):
                producer.send(topic, b"%d" % i)
        assert bus.enforce_retention() == 0  # young
        two_minutes_later = int(time.time() * 1000) + 120_000
        assert bus.enforce_retention(now_ms=two_minutes_later) == 5  # no group holds them back
        with bus.producer() as producer:
            producer.send(topic, b"5")
        with bus.consumer(unique("g"), [topic]) as consumer:
            assert [(r.offset, r.value) for r in poll_until(consumer, 1)] == [(5, b"5")]
            assert consumer.end_offsets([tp]) == {tp: 6}


# -- factory ----------------------------------------------------------------------------


def test_open_bus_embedded_creates_the_directory(tmp_path: Path) -> None:
    settings = BusSettings(embedded_path=str(tmp_path / "var" / "bus.db"), partitions=3)
    with open_bus(settings) as bus:
        assert isinstance(bus, SqliteEventBus)
        with bus.producer() as producer:
            producer.send("auto.created", b"x", key=b"k")
        assert bus.partitions_for("auto.created") == 3  # settings.partitions for auto-created topics


def test_bus_flags_fall_back_to_environment_then_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    environ = {
        "SNAPLEARN_BUS": "kafka",
        "SNAPLEARN_KAFKA_BOOTSTRAP": "broker:9092",
        "SNAPLEARN_KAFKA_SASL_PLAIN_PASSWORD": "hunter2",
    }
    from_env = BusSettings.from_argv([], environ=environ)
    assert (from_env.backend, from_env.kafka_bootstrap_servers) == ("kafka", "broker:9092")
    assert from_env.kafka_security == {"sasl_plain_password": "hunter2"}
    assert "hunter2" not in repr(from_env)
    flags = ["--bus", "embedded", "--bus-path", "/tmp/x.db", "--bus-partitions", "8"]
    from_flags = BusSettings.from_argv(flags, environ=environ)
    assert (from_flags.backend, from_flags.embedded_path, from_flags.partitions) == (
        "embedded",
        "/tmp/x.db",
        8,
    )
    defaults = BusSettings.from_argv([], environ={})
    for name in BusSettings.env_names():
        monkeypatch.delenv(name, raising=False)
    assert defaults == BusSettings()
