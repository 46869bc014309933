"""The recommender worker on the embedded bus: dead letters, and exactly-once application across restarts.

Real components: the SQLite bus in tmp_path, the LightFM model, the checkpoint files; the
worker runs its own thread as in the server.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from snaplearn_common.eventbus.base import TopicPartition, partition_for_key
from snaplearn_common.eventbus.sqlite import SqliteEventBus
from snaplearn_common.events import (
    HEADER_EVENT_ID,
    HEADER_SCHEMA_VERSION,
    EncodedEvent,
    encode_image_classified,
)
from snaplearn_recommender.catalog import generate_sample_catalog
from snaplearn_recommender.checkpoint import Checkpointer
from snaplearn_recommender.metrics import RecommenderMetrics
from snaplearn_recommender.model import RecommenderModel
from snaplearn_recommender.worker import RecommenderWorker, WorkerSettings
from tests.contract.eventbus_contract import poll_until, unique

PARTITIONS = 2
CATALOG = generate_sample_catalog()


def event(i: int, user: str = "student-1") -> EncodedEvent:
    return encode_image_classified(f"event-{i}", user, 1_700_000_000.0 + i, "m", "1", [("fractions", 0.9)])


@pytest.fixture
def bus(tmp_path: Path) -> Iterator[SqliteEventBus]:
    with SqliteEventBus(tmp_path / "bus.db", auto_create_partitions=PARTITIONS) as bus:
        yield bus


@pytest.fixture
def settings() -> WorkerSettings:
    return WorkerSettings(
        topic=unique("classified"), group_id=unique("recommender"), topic_partitions=PARTITIONS
    )


def send(
    bus: SqliteEventBus, topic: str, records: list[tuple[bytes, bytes, tuple[tuple[str, bytes], ...]]]
) -> None:
    bus.create_topic(topic, PARTITIONS)
    with bus.producer() as producer:
        for value, key, headers in records:
            producer.send(topic, value, key=key, headers=headers)
        producer.flush()


def run_until_applied(worker: RecommenderWorker, model: RecommenderModel, count: int) -> None:
    worker.start()
    try:
        deadline = time.monotonic() + 30
        while model.events_applied < count:
            assert time.monotonic() < deadline, f"applied {model.events_applied} of {count}"
            time.sleep(0.01)
    finally:
        worker.stop()


def test_poison_records_are_dead_lettered_and_the_partition_keeps_flowing(
    bus: SqliteEventBus, settings: WorkerSettings
) -> None:
    good = [event(i) for i in range(4)]
    future = (*good[0].headers[:1], (HEADER_SCHEMA_VERSION, b"2"), (HEADER_EVENT_ID, b"from-the-future"))
    send(
        bus,
        settings.topic,
        [
            (good[0].value, good[0].key, good[0].headers),
            (b"\x0a\xff\xff garbage", b"student-1", good[0].headers[:2]),
            (good[1].value, good[1].key, good[1].headers),
            (good[2].value, b"student-1", future),
            (good[2].value, good[2].key, good[2].headers),
            (good[3].value, good[3].key, good[3].headers),
        ],
    )
    model = RecommenderModel(CATALOG)
    metrics = RecommenderMetrics()
    worker = RecommenderWorker(bus, model, lambda snapshot: None, settings, metrics)
    metrics.watch_worker(worker.stats)
    run_until_applied(worker, model, 4)
    assert (model.events_applied, worker.stats.dead_lettered) == (4, 2)
    scraped = metrics.registry.get_sample_value
    assert scraped("snaplearn_recommender_worker_dead_lettered_total") == 2
    assert scraped("snaplearn_recommender_worker_records_consumed_total") == 6
    assert scraped("snaplearn_recommender_malformed_events_total") == 2

    with bus.consumer(unique("dlq-reader"), [settings.dead_letter_topic]) as consumer:
        dead = sorted(poll_until(consumer, 2), key=lambda r: int(r.header("dlq-origin-offset") or b"0"))
        assert consumer.poll(timeout_s=0.05) == []
    partition = partition_for_key(b"student-1", PARTITIONS)
    assert [r.header("dlq-origin-offset") for r in dead] == [b"1", b"3"]
    assert dead[0].value == b"\x0a\xff\xff garbage"
    assert b"malformed" in (dead[0].header("dlq-error") or b"")
    assert b"schema version" in (dead[1].header("dlq-error") or b"")
    assert dead[1].header(HEADER_EVENT_ID) == b"from-the-future"
    for record in dead:
        assert record.key == b"student-1"
        assert record.header("dlq-origin-topic") == settings.topic.encode()
        assert record.header("dlq-origin-partition") == str(partition).encode()


def test_restart_from_an_older_checkpoint_applies_each_event_once(
    bus: SqliteEventBus, settings: WorkerSettings, tmp_path: Path
) -> None:
    checkpoints = Checkpointer(tmp_path / "ckpt")
    users = [f"student-{u}" for u in range(5)]
    send(
        bus,
        settings.topic,
        [(e.value, e.key, e.headers) for e in (event(i, users[i % 5]) for i in range(20))],
    )

    first = RecommenderModel(CATALOG)
    run_until_applied(
        RecommenderWorker(bus, first, lambda s: None, settings, checkpointer=checkpoints), first, 20
    )
    shutil.copy(checkpoints.path, tmp_path / "at-20.ckpt")

    send(
        bus,
        settings.topic,
        [(e.value, e.key, e.headers) for e in (event(i, users[i % 5]) for i in range(20, 40))],
    )
    restored = checkpoints.load()
    assert restored is not None
    second = RecommenderWorker(bus, restored.model, lambda s: None, settings, checkpointer=checkpoints,
                               resume_offsets=restored.offsets)  # fmt: skip
    run_until_applied(second, restored.model, 40)
    # The group's committed offsets now say 40; the process "dies" before its checkpoint
    # survives: the next start finds the checkpoint at 20 and must apply 20..39 again, once.
    shutil.copy(tmp_path / "at-20.ckpt", checkpoints.path)
    with bus.consumer(settings.group_id, [settings.topic]) as probe:
        committed = sum(probe.committed(TopicPartition(settings.topic, p)) or 0 for p in range(PARTITIONS))
    assert committed == 40

    old = checkpoints.load()
    assert old is not None and old.model.events_applied == 20
    third = RecommenderWorker(bus, old.model, lambda s: None, settings, checkpointer=checkpoints,
                              resume_offsets=old.offsets)  # fmt: skip
    run_until_applied(third, old.model, 40)
    time.sleep(0.3)  # a second application would show up here
    assert old.model.events_applied == 40
    assert third.stats.duplicates == 0 and third.stats.events_applied == 20
    final = checkpoints.load()
    assert final is not None and final.model.events_applied == 40
    assert sum(final.offsets.values()) == 40
