"""The embedded bus's retention: by age and by size, on by default, never past a group's commit.

Real SQLite files in tmp_path, real producers and consumer groups; the metrics through a real
Prometheus registry.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest

from snaplearn_common.eventbus.base import TopicPartition
from snaplearn_common.eventbus.factory import open_bus
from snaplearn_common.eventbus.metrics import watch_embedded_bus
from snaplearn_common.eventbus.settings import BusSettings
from snaplearn_common.eventbus.sqlite import RetentionPolicy, SqliteEventBus
from tests.contract.eventbus_contract import poll_until, unique

RECORD = b"x" * 1000  # no key, no headers: 1000 bytes a record as retention counts them
DAY_MS = 24 * 3600 * 1000


def _fill(bus: SqliteEventBus, topic: str, count: int) -> None:
    with bus.producer() as producer:
        for _ in range(count):
            producer.send(topic, RECORD)


def _offsets(bus: SqliteEventBus, topic: str) -> list[int]:
    with sqlite3.connect(bus.path) as conn:
        rows = conn.execute('SELECT "offset" FROM records WHERE topic = ? ORDER BY "offset"', (topic,))
        return [int(row[0]) for row in rows]


def test_retention_by_size_deletes_only_what_every_group_committed_past(tmp_path: Path) -> None:
    topic = unique("sized")
    tp = TopicPartition(topic, 0)
    policy = RetentionPolicy(max_bytes_per_partition=20_000)  # 20 of the 100 records
    with SqliteEventBus(tmp_path / "bus.db", retention=policy) as bus:
        bus.create_topic(topic, 1)
        _fill(bus, topic, 100)
        with bus.consumer("ahead", [topic]) as ahead, bus.consumer("behind", [topic]) as behind:
            poll_until(ahead, 100)
            ahead.commit()
            behind.commit({tp: 30})
            # Size says keep 80..99; the group behind still needs 30 onwards.
            assert bus.enforce_retention() == 30
            assert _offsets(bus, topic) == list(range(30, 100))
            assert bus.stats().oldest_offsets[tp] == 30
            # What the group behind reads next is all still there, in order.
            assert [r.offset for r in poll_until(behind, 70)] == list(range(30, 100))
            behind.commit({tp: 90})
            assert bus.enforce_retention() == 50  # now size is the limit: 80..99 kept
            assert _offsets(bus, topic) == list(range(80, 100))
            assert bus.enforce_retention() == 0
        stats = bus.stats()
        assert stats.oldest_offsets[tp] == 80 and stats.next_offsets[tp] == 100


def test_a_reader_that_has_not_committed_yet_holds_its_partition(tmp_path: Path) -> None:
    # A recommender before its first checkpoint commits nothing: what it has not read yet stays.
    topic = unique("first-read")
    tp = TopicPartition(topic, 0)
    with SqliteEventBus(tmp_path / "bus.db", retention=RetentionPolicy(max_records_per_partition=5)) as bus:
        bus.create_topic(topic, 1)
        _fill(bus, topic, 20)
        with bus.consumer("new-reader", [topic]) as reader:
            assert [r.offset for r in poll_until(reader, 20)] == list(range(20))  # it is a member now
            assert bus.enforce_retention() == 0
            reader.commit({tp: 8})
            assert bus.enforce_retention() == 8
            assert _offsets(bus, topic) == list(range(8, 20))
        # Gone without committing more: its commit still counts (fresh), the member does not.
        assert bus.enforce_retention() == 0


def test_retention_by_age_waits_for_the_groups_commit(tmp_path: Path) -> None:
    topic = unique("aged")
    tp = TopicPartition(topic, 0)
    with SqliteEventBus(tmp_path / "bus.db", retention=RetentionPolicy(max_age_ms=DAY_MS)) as bus:
        bus.create_topic(topic, 1)
        _fill(bus, topic, 10)
        later = int(time.time() * 1000) + 2 * DAY_MS
        with bus.consumer("reader", [topic]) as reader:
            reader.commit({tp: 4})
            assert bus.enforce_retention(now_ms=later) == 4  # old enough, but only 0..3 consumed
            assert _offsets(bus, topic) == list(range(4, 10))


def test_a_commit_of_a_group_gone_for_good_stops_holding_the_log(tmp_path: Path) -> None:
    topic = unique("abandoned")
    tp = TopicPartition(topic, 0)
    policy = RetentionPolicy(max_records_per_partition=2)  # offsets_retention_ms: 7 days by default
    with SqliteEventBus(tmp_path / "bus.db", retention=policy) as bus:
        bus.create_topic(topic, 1)
        _fill(bus, topic, 10)
        with bus.consumer("gone", [topic]) as gone:
            gone.commit({tp: 1})
        assert bus.enforce_retention() == 1  # its commit is fresh: it holds 1..9
        eight_days_later = int(time.time() * 1000) + 8 * DAY_MS
        assert bus.enforce_retention(now_ms=eight_days_later) == 7  # no member, old commit
        assert _offsets(bus, topic) == [8, 9]


def test_a_new_bus_file_gives_retained_space_back(tmp_path: Path) -> None:
    topic = unique("vacuum")
    tp = TopicPartition(topic, 0)
    path = tmp_path / "bus.db"
    with SqliteEventBus(path, retention=RetentionPolicy(max_bytes_per_partition=50_000)) as bus:
        bus.create_topic(topic, 1)
        big = b"y" * 20_000
        with bus.producer() as producer:
            for _ in range(200):
                producer.send(topic, big)
        with bus.consumer("reader", [topic]) as reader:
            reader.commit({tp: 200})
        with sqlite3.connect(path) as conn:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            full = path.stat().st_size
        assert bus.enforce_retention() == 198  # 2 x 20 kB fit in 50 kB
        with sqlite3.connect(path) as conn:
            assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # INCREMENTAL
            assert conn.execute("PRAGMA freelist_count").fetchone()[0] == 0
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        assert path.stat().st_size < full / 10, (path.stat().st_size, full)


def test_retention_is_on_by_default_and_set_by_flags_or_environment(tmp_path: Path) -> None:
    defaults = BusSettings(embedded_path=str(tmp_path / "bus.db"))
    with open_bus(defaults) as bus:
        assert isinstance(bus, SqliteEventBus) and bus.retention.enabled
        assert bus.retention.max_age_ms == 7 * DAY_MS
        assert bus.retention.max_bytes_per_partition == 256 * 1024 * 1024
    from_env = BusSettings.from_env(
        {"SNAPLEARN_BUS_RETENTION_BYTES": "1000", "SNAPLEARN_BUS_RETENTION_AGE": "0"}
    )
    assert from_env.retention_bytes == 1000 and from_env.retention_age_s == 0
    off = BusSettings(embedded_path=str(tmp_path / "off.db"), retention_age_s=0, retention_bytes=0)
    with open_bus(off) as bus:
        assert isinstance(bus, SqliteEventBus) and not bus.retention.enabled


def test_bus_size_and_oldest_offset_are_metrics(tmp_path: Path) -> None:
    topic = unique("metrics")
    tp = TopicPartition(topic, 0)
    with SqliteEventBus(tmp_path / "bus.db", retention=RetentionPolicy(max_records_per_partition=3)) as bus:
        bus.create_topic(topic, 1)
        _fill(bus, topic, 10)
        with bus.consumer("reader", [topic]) as reader:
            reader.commit({tp: 10})
        bus.enforce_retention()
        registry = CollectorRegistry()
        assert watch_embedded_bus(bus, registry)
        text = generate_latest(registry).decode()
    assert f'snaplearn_bus_oldest_offset{{partition="0",topic="{topic}"}} 7.0' in text
    assert f'snaplearn_bus_next_offset{{partition="0",topic="{topic}"}} 10.0' in text
    size_line = next(line for line in text.splitlines() if line.startswith("snaplearn_bus_file_bytes "))
    assert float(size_line.split()[1]) > 10_000
