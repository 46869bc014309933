"""The embedded event bus: an append-only log in one SQLite file, shared across processes.

The vision server (producer) and the recommender worker (consumer) are separate processes
on one machine; they share the database file. SQLite's WAL mode lets readers run while one
writer appends, and `BEGIN IMMEDIATE` takes the write lock up front so that two producers
(in any processes) never allocate the same offset.

Tables:
- topics(name, partitions)                      fixed partition count per topic
- partitions(topic, partition, next_offset)     the high watermark; survives retention
- records(topic, partition, offset, key, value, headers, timestamp_ms)
- offsets(group_id, topic, partition, offset)   committed next-offset-to-read per group
- members(group_id, member_id, topics, heartbeat_ms)
- owners(group_id, topic, partition, member_id) which live member reads which partition
- groups(group_id, generation)                  bumped on every membership/ownership change

Consumer groups without a coordinator: each member heartbeats on poll, evicts members
whose heartbeat is older than the session timeout, computes the same deterministic
round-robin assignment from the sorted member list, releases partitions it should no
longer own and claims partitions that are assigned to it *and free*. A partition is thus
never read by two live members at once: the new owner waits until the old owner releases
it (on its next poll) or expires. Each change bumps the group's generation, which other
members notice cheaply (PRAGMA data_version, then one primary-key read).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import random
import re
import sqlite3
import struct
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

from snaplearn_common.errors import InvalidInput, NotFound, SnapLearnError
from snaplearn_common.eventbus.base import (
    Consumer,
    DeliveryFailed,
    EventBus,
    Headers,
    Producer,
    ProducerRecord,
    Record,
    TopicPartition,
    partition_for_key,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

OffsetReset = Literal["earliest", "latest"]
# How long a connection waits for another's write lock before SQLite reports BUSY.
_BUSY_TIMEOUT_S = 5.0

SCHEMA_VERSION = 1

# Kafka's rule for topic names, so that a name that works here also works on Kafka.
_TOPIC_NAME = re.compile(r"^[A-Za-z0-9._-]{1,249}$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS topics (
    name TEXT PRIMARY KEY,
    partitions INTEGER NOT NULL CHECK (partitions > 0),
    created_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS partitions (
    topic TEXT NOT NULL,
    partition INTEGER NOT NULL,
    next_offset INTEGER NOT NULL,
    PRIMARY KEY (topic, partition)
) WITHOUT ROWID;
-- A rowid table (not WITHOUT ROWID): event payloads are too large for index-organised pages.
CREATE TABLE IF NOT EXISTS records (
    topic TEXT NOT NULL,
    partition INTEGER NOT NULL,
    "offset" INTEGER NOT NULL,
    key BLOB,
    value BLOB NOT NULL,
    headers BLOB,
    timestamp_ms INTEGER NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS records_by_offset ON records (topic, partition, "offset");
CREATE TABLE IF NOT EXISTS offsets (
    group_id TEXT NOT NULL,
    topic TEXT NOT NULL,
    partition INTEGER NOT NULL,
    "offset" INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL,
    PRIMARY KEY (group_id, topic, partition)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS members (
    group_id TEXT NOT NULL,
    member_id TEXT NOT NULL,
    topics TEXT NOT NULL,
    heartbeat_ms INTEGER NOT NULL,
    PRIMARY KEY (group_id, member_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS owners (
    group_id TEXT NOT NULL,
    topic TEXT NOT NULL,
    partition INTEGER NOT NULL,
    member_id TEXT NOT NULL,
    PRIMARY KEY (group_id, topic, partition)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS groups (
    group_id TEXT PRIMARY KEY,
    generation INTEGER NOT NULL
) WITHOUT ROWID;
"""


# ---------------------------------------------------------------------------------------
# Low-level helpers: connections, busy retries, header encoding.


def _now_ms() -> int:
    # Wall clock, not monotonic: heartbeats are compared across processes and across
    # restarts (a monotonic clock restarts at boot and would make old members immortal).
    return int(time.time() * 1000)


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return (code & 0xFF) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    message = str(exc).lower()
    return "locked" in message or "busy" in message


def _retry_busy(operation: Callable[[], T], deadline: float | None, what: str) -> T:
    """Run `operation`, retrying with backoff while SQLite reports BUSY/LOCKED.

    busy_timeout already makes SQLite wait for locks; this covers the cases where SQLite
    returns BUSY without calling the busy handler (WAL recovery, a snapshot that cannot be
    upgraded) and a busy_timeout that expired under heavy contention.
    """
    backoff_s = 0.001
    while True:
        try:
            return operation()
        except sqlite3.OperationalError as exc:
            if not _is_busy(exc) or (deadline is not None and time.monotonic() + backoff_s > deadline):
                raise
            log.debug("sqlite busy during %s; retrying in %.3f s", what, backoff_s)
            time.sleep(backoff_s * (0.5 + random.random()))
            backoff_s = min(backoff_s * 2, 0.1)


def _write_transaction(
    conn: sqlite3.Connection, body: Callable[[sqlite3.Connection], T], deadline: float | None, what: str
) -> T:
    """Run `body` inside BEGIN IMMEDIATE ... COMMIT, retried as a whole on BUSY."""

    def attempt() -> T:
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = body(conn)
            conn.execute("COMMIT")
            return result
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    return _retry_busy(attempt, deadline, what)


def _connect(path: Path) -> sqlite3.Connection:
    # isolation_level=None: the sqlite3 module must not open transactions behind our back;
    # every write goes through _write_transaction (BEGIN IMMEDIATE).
    # check_same_thread=False: a producer's connection is used by whichever thread sends a
    # batch; the producer serialises access with its lock.
    conn = sqlite3.connect(path, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
    try:
        # Only takes effect on a new, empty file (before its tables exist): retention then gives
        # freed pages back with PRAGMA incremental_vacuum. An existing file keeps its mode.
        conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
        # journal_mode=WAL is persistent in the file; switching needs a brief exclusive lock,
        # which another process opening the file at the same moment may hold.
        _retry_busy(lambda: conn.execute("PRAGMA journal_mode=WAL").fetchall(), None, "enable WAL")
        conn.execute(f"PRAGMA busy_timeout={int(_BUSY_TIMEOUT_S * 1000)}")
        # synchronous=NORMAL in WAL mode fsyncs the WAL only at checkpoints, not per commit.
        # A commit is still durable against a crash of any process (the WAL is in the OS page
        # cache) and the database cannot be corrupted by power loss; only the last commits
        # before a power cut / kernel crash may be lost. Commits are much cheaper than with
        # FULL: the right trade for an event stream that the vision server can replay.
        conn.execute("PRAGMA synchronous=NORMAL")
        # After a checkpoint, truncate a WAL that a burst grew beyond 64 MB (else it keeps its size).
        conn.execute("PRAGMA journal_size_limit=67108864")
    except BaseException:
        conn.close()
        raise
    return conn


def _ensure_schema(conn: sqlite3.Connection) -> None:
    def body(c: sqlite3.Connection) -> None:
        version = c.execute("PRAGMA user_version").fetchall()[0][0]
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"event bus database has schema version {version}; this code reads {SCHEMA_VERSION}"
            )
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                c.execute(statement)
        if version < SCHEMA_VERSION:
            c.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    _write_transaction(conn, body, None, "create schema")


_HEADER_COUNT = struct.Struct(">I")
_HEADER_NAME_LEN = struct.Struct(">H")
_HEADER_VALUE_LEN = struct.Struct(">I")


def encode_headers(headers: Headers) -> bytes | None:
    """Length-prefixed binary encoding: byte-exact, keeps order and duplicate names."""
    if not headers:
        return None
    parts = [_HEADER_COUNT.pack(len(headers))]
    for name, value in headers:
        name_bytes = name.encode("utf-8")
        parts += [_HEADER_NAME_LEN.pack(len(name_bytes)), name_bytes]
        parts += [_HEADER_VALUE_LEN.pack(len(value)), bytes(value)]
    return b"".join(parts)


def decode_headers(blob: bytes | None) -> Headers:
    if not blob:
        return ()
    (count,) = _HEADER_COUNT.unpack_from(blob, 0)
    pos = _HEADER_COUNT.size
    headers: list[tuple[str, bytes]] = []
    for _ in range(count):
        (name_len,) = _HEADER_NAME_LEN.unpack_from(blob, pos)
        pos += _HEADER_NAME_LEN.size
        name = blob[pos : pos + name_len].decode("utf-8")
        pos += name_len
        (value_len,) = _HEADER_VALUE_LEN.unpack_from(blob, pos)
        pos += _HEADER_VALUE_LEN.size
        headers.append((name, bytes(blob[pos : pos + value_len])))
        pos += value_len
    return tuple(headers)


def _validate_topic_name(topic: str) -> None:
    if not _TOPIC_NAME.match(topic):
        raise InvalidInput(f"invalid topic name {topic!r}: use 1-249 characters from [A-Za-z0-9._-]")


def _create_topic(conn: sqlite3.Connection, topic: str, partitions: int) -> int:
    """Create the topic if absent; return its partition count (the existing one if present)."""
    _validate_topic_name(topic)
    if partitions < 1:
        raise InvalidInput(f"a topic needs at least one partition, got {partitions}")

    def body(c: sqlite3.Connection) -> int:
        row = c.execute("SELECT partitions FROM topics WHERE name = ?", (topic,)).fetchall()
        if row:
            return int(row[0][0])
        c.execute(
            "INSERT INTO topics (name, partitions, created_ms) VALUES (?, ?, ?)",
            (topic, partitions, _now_ms()),
        )
        c.executemany(
            "INSERT INTO partitions (topic, partition, next_offset) VALUES (?, ?, 0)",
            [(topic, p) for p in range(partitions)],
        )
        return partitions

    existing = _write_transaction(conn, body, None, "create topic")
    if existing != partitions:
        log.info("topic %s already exists with %d partitions (asked for %d)", topic, existing, partitions)
    return existing


def _partitions_for(conn: sqlite3.Connection, topic: str) -> int | None:
    rows = _retry_busy(
        lambda: conn.execute("SELECT partitions FROM topics WHERE name = ?", (topic,)).fetchall(),
        None,
        "read topic",
    )
    return int(rows[0][0]) if rows else None


def _end_offsets(conn: sqlite3.Connection, tps: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
    def read() -> dict[TopicPartition, int]:
        result: dict[TopicPartition, int] = {}
        for tp in tps:
            row = conn.execute(
                "SELECT next_offset FROM partitions WHERE topic = ? AND partition = ?",
                (tp.topic, tp.partition),
            ).fetchall()
            if not row:
                raise NotFound(f"no partition {tp.partition} in topic {tp.topic!r}")
            result[TopicPartition(tp.topic, tp.partition)] = int(row[0][0])
        return result

    return _retry_busy(read, None, "read end offsets")


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """Delete a partition's oldest records once they are expired *and* consumed.

    A record is expired when it is older than `max_age_ms` (Kafka's retention.ms), when the
    partition's records after it hold more than `max_bytes_per_partition` bytes of key, value
    and headers (retention.bytes), or when more than `max_records_per_partition` newer
    records follow it. It is consumed when every group that has committed an offset on its
    partition has committed past it, and no member of a group that has not committed on it
    yet is reading the topic (a group that never committed and has no member does not hold
    records back). The recommender commits only offsets its checkpoint holds, so what a
    checkpoint may replay from is never deleted. A group's commit stops holding records back
    once it is older than `offsets_retention_ms` and the group has no member (Kafka's
    offsets.retention.minutes): a reader that went away for good does not pin the log.
    Deletion keeps the log a prefix-trimmed sequence: it never punches holes, so offsets
    stay contiguous. Freed pages are reused by new records; a file created with
    auto_vacuum=INCREMENTAL (every new bus file) also gives them back to the filesystem.
    """

    max_age_ms: int | None = None
    max_records_per_partition: int | None = None
    max_bytes_per_partition: int | None = None
    offsets_retention_ms: int = 7 * 24 * 3600 * 1000
    check_interval_s: float = 60.0
    # Deleting in chunks keeps each write transaction (and so the producers' wait) short.
    delete_chunk: int = 5000

    @property
    def enabled(self) -> bool:
        return (
            self.max_age_ms is not None
            or self.max_records_per_partition is not None
            or self.max_bytes_per_partition is not None
        )


def _enforce_retention(conn: sqlite3.Connection, policy: RetentionPolicy, now_ms: int) -> int:
    if not policy.enabled:
        return 0

    def read_partitions() -> list[tuple[str, int, int]]:
        return [
            (str(t), int(p), int(n))
            for t, p, n in conn.execute("SELECT topic, partition, next_offset FROM partitions").fetchall()
        ]

    deleted = 0
    for topic, partition, next_offset in _retry_busy(read_partitions, None, "retention scan"):
        expired_before = 0
        if policy.max_records_per_partition is not None:
            expired_before = max(expired_before, next_offset - policy.max_records_per_partition)
        if policy.max_age_ms is not None:
            threshold_ms = now_ms - policy.max_age_ms
            # The first record young enough to keep, walking in offset order (index order),
            # so only the expired prefix is scanned.
            row = conn.execute(
                'SELECT "offset" FROM records WHERE topic = ? AND partition = ? AND timestamp_ms >= ? '
                'ORDER BY "offset" LIMIT 1',
                (topic, partition, threshold_ms),
            ).fetchall()
            expired_before = max(expired_before, int(row[0][0]) if row else next_offset)
        if policy.max_bytes_per_partition is not None:
            expired_before = max(
                expired_before, _over_size_before(conn, topic, partition, policy.max_bytes_per_partition)
            )
        floor_row = conn.execute(
            'SELECT MIN(o."offset") FROM offsets o WHERE o.topic = ? AND o.partition = ? AND '
            "(o.updated_ms >= ? OR EXISTS (SELECT 1 FROM members m WHERE m.group_id = o.group_id))",
            (topic, partition, now_ms - policy.offsets_retention_ms),
        ).fetchall()
        consumed_before = next_offset if floor_row[0][0] is None else int(floor_row[0][0])
        # A member reading this topic for a group that has not committed on this partition yet
        # (a recommender before its first checkpoint) may still need all of it.
        waiting = conn.execute(
            "SELECT 1 FROM members m WHERE instr(',' || m.topics || ',', ',' || ? || ',') > 0 AND NOT EXISTS "
            "(SELECT 1 FROM offsets o WHERE o.group_id = m.group_id AND o.topic = ? AND o.partition = ?) "
            "LIMIT 1",
            (topic, topic, partition),
        ).fetchall()
        if waiting:
            continue
        delete_before = min(expired_before, consumed_before)
        if delete_before <= 0:
            continue
        while True:

            def delete_chunk(
                c: sqlite3.Connection, _t: str = topic, _p: int = partition, _before: int = delete_before
            ) -> int:
                first = c.execute(
                    'SELECT MIN("offset") FROM records WHERE topic = ? AND partition = ?', (_t, _p)
                ).fetchall()[0][0]
                if first is None or first >= _before:
                    return 0
                upper = min(_before, int(first) + policy.delete_chunk)
                cursor = c.execute(
                    'DELETE FROM records WHERE topic = ? AND partition = ? AND "offset" < ?', (_t, _p, upper)
                )
                return cursor.rowcount

            count = _write_transaction(conn, delete_chunk, None, "retention delete")
            if count == 0:
                break
            deleted += count
    if deleted:
        log.info("event bus retention deleted %d records", deleted)
        _reclaim(conn)
    return deleted


_RECORD_BYTES = "length(value) + ifnull(length(key), 0) + ifnull(length(headers), 0)"


def _over_size_before(conn: sqlite3.Connection, topic: str, partition: int, max_bytes: int) -> int:
    """The first offset to keep so that the partition holds at most max_bytes (0: none to drop)."""
    total = conn.execute(
        f"SELECT ifnull(SUM({_RECORD_BYTES}), 0) FROM records WHERE topic = ? AND partition = ?",
        (topic, partition),
    ).fetchall()[0][0]
    excess = int(total) - max_bytes
    if excess <= 0:
        return 0
    # The oldest records whose bytes add up to the excess: a running sum in offset order.
    row = conn.execute(
        f'SELECT "offset" FROM (SELECT "offset", SUM({_RECORD_BYTES}) OVER (ORDER BY "offset") AS upto '
        'FROM records WHERE topic = ? AND partition = ?) WHERE upto >= ? ORDER BY "offset" LIMIT 1',
        (topic, partition, excess),
    ).fetchall()
    return int(row[0][0]) + 1 if row else 0


def _reclaim(conn: sqlite3.Connection) -> None:
    """Give the pages retention freed back to the filesystem (files with incremental auto-vacuum)."""
    mode = int(conn.execute("PRAGMA auto_vacuum").fetchall()[0][0])
    if mode != 2:  # 2 = INCREMENTAL; an older file reuses its free pages but keeps its size
        return
    # executescript, not execute: the pragma frees one page per step, and the sqlite3 module
    # steps a statement that returns no rows only once.
    _retry_busy(lambda: conn.executescript("PRAGMA incremental_vacuum;"), None, "incremental vacuum")


@dataclass(frozen=True, slots=True)
class BusStats:
    """What the embedded log holds now (for metrics)."""

    file_bytes: int  # the database file plus its write-ahead log
    oldest_offsets: dict[TopicPartition, int]  # the oldest offset still in the log, per partition
    next_offsets: dict[TopicPartition, int]  # the offset the next record will get


def read_stats(conn: sqlite3.Connection, path: Path) -> BusStats:
    size = 0
    for file in (path, path.with_name(path.name + "-wal")):
        with contextlib.suppress(FileNotFoundError):
            size += file.stat().st_size

    def read() -> tuple[dict[TopicPartition, int], dict[TopicPartition, int]]:
        nexts = {
            TopicPartition(str(t), int(p)): int(n)
            for t, p, n in conn.execute("SELECT topic, partition, next_offset FROM partitions").fetchall()
        }
        oldest = {}
        for tp, next_offset in nexts.items():
            row = conn.execute(
                'SELECT MIN("offset") FROM records WHERE topic = ? AND partition = ?',
                (tp.topic, tp.partition),
            ).fetchall()
            oldest[tp] = next_offset if row[0][0] is None else int(row[0][0])
        return oldest, nexts

    oldest, nexts = _retry_busy(read, None, "read bus stats")
    return BusStats(size, oldest, nexts)


# ---------------------------------------------------------------------------------------
# The bus.


class SqliteEventBus(EventBus):
    """The embedded backend: an event bus in one SQLite file (WAL), usable from many processes.

    session_timeout_s: a consumer group member that has not polled for this long is
    evicted and its partitions go to the other members. Poll more often than that.
    auto_offset_reset: where a group starts on a partition it has never committed.
    auto_create_partitions: producers sending to an unknown topic create it with this many
    partitions (like Kafka's auto.create.topics.enable); None makes that an error.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        session_timeout_s: float = 10.0,
        auto_offset_reset: OffsetReset = "earliest",
        auto_create_partitions: int | None = 4,
        retention: RetentionPolicy | None = None,
    ) -> None:
        if auto_offset_reset not in ("earliest", "latest"):
            raise InvalidInput(f"auto_offset_reset must be 'earliest' or 'latest', got {auto_offset_reset!r}")
        if session_timeout_s <= 0:
            raise InvalidInput("session_timeout_s must be positive")
        self.path = Path(path)
        self.session_timeout_s = session_timeout_s
        self.auto_offset_reset: OffsetReset = auto_offset_reset
        self.auto_create_partitions = auto_create_partitions
        self.retention = retention or RetentionPolicy()
        self._lock = threading.Lock()
        self._closed = False
        self._children: weakref.WeakSet[SqliteProducer | SqliteConsumer] = weakref.WeakSet()
        self._conn = self.connect()
        try:
            _ensure_schema(self._conn)
        except BaseException:
            self._conn.close()
            raise

    def connect(self) -> sqlite3.Connection:
        """A new connection with this bus's pragmas (each producer/consumer owns one)."""
        return _connect(self.path)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("event bus is closed")

    def create_topic(self, topic: str, partitions: int) -> None:
        with self._lock:
            self._check_open()
            _create_topic(self._conn, topic, partitions)

    def partitions_for(self, topic: str) -> int:
        with self._lock:
            self._check_open()
            count = _partitions_for(self._conn, topic)
        if count is None:
            raise NotFound(f"no topic {topic!r}")
        return count

    def producer(self) -> SqliteProducer:
        with self._lock:
            self._check_open()
            producer = SqliteProducer(self)
            self._children.add(producer)
            return producer

    def consumer(
        self,
        group_id: str,
        topics: Sequence[str],
        *,
        auto_offset_reset: OffsetReset | None = None,
        instance_id: str | None = None,
    ) -> SqliteConsumer:
        # instance_id is accepted and not needed: the embedded bus's members live in this
        # host's processes, and a dead process's member is noticed by its lease, not by a name.
        del instance_id
        with self._lock:
            self._check_open()
            consumer = SqliteConsumer(self, group_id, topics, auto_offset_reset or self.auto_offset_reset)
            self._children.add(consumer)
            return consumer

    def stats(self) -> BusStats:
        """The file's size and the offsets it holds, per partition."""
        with self._lock:
            self._check_open()
            return read_stats(self._conn, self.path)

    def enforce_retention(self, now_ms: int | None = None) -> int:
        """Delete expired, consumed records now; returns how many. Producers also run this periodically."""
        with self._lock:
            self._check_open()
            return _enforce_retention(self._conn, self.retention, _now_ms() if now_ms is None else now_ms)

    def close(self) -> None:
        """Close the bus and every producer (flushing it) and consumer it handed out."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            children = list(self._children)
        errors: list[BaseException] = []
        for child in children:
            try:
                child.close()
            except Exception as exc:  # close the rest before reporting
                errors.append(exc)
        self._conn.close()
        if errors:
            raise errors[0]


# ---------------------------------------------------------------------------------------
# Producer.


_Row = tuple[str, int, int, bytes | None, bytes, bytes | None, int]


def _append(
    conn: sqlite3.Connection, placed: Sequence[tuple[ProducerRecord, int]], timestamp_ms: int
) -> None:
    """Within a write transaction: give each (record, partition) the next offset and insert it."""
    next_offsets: dict[tuple[str, int], int] = {}
    rows: list[_Row] = []
    for record, partition in placed:
        tp = (record.topic, partition)
        offset = next_offsets.get(tp)
        if offset is None:
            found = conn.execute(
                "SELECT next_offset FROM partitions WHERE topic = ? AND partition = ?", tp
            ).fetchall()
            if not found:
                raise NotFound(f"no partition {partition} in topic {record.topic!r}")
            offset = int(found[0][0])
        rows.append(
            (
                record.topic,
                partition,
                offset,
                record.key,
                record.value,
                encode_headers(record.headers),
                timestamp_ms,
            )
        )
        next_offsets[tp] = offset + 1
    conn.executemany(
        'INSERT INTO records (topic, partition, "offset", key, value, headers, timestamp_ms) '
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        rows,
    )
    conn.executemany(
        "UPDATE partitions SET next_offset = ? WHERE topic = ? AND partition = ?",
        [(offset, topic, partition) for (topic, partition), offset in next_offsets.items()],
    )


@functools.lru_cache(maxsize=65_536)
def _cached_partition_for_key(key: bytes, partitions: int) -> int:
    # Keys (user ids) repeat and murmur2 runs in pure Python: cache it.
    return partition_for_key(key, partitions)


class SqliteProducer(Producer):
    """Writes each batch in one transaction, in the calling thread; thread-safe.

    Offsets are allocated inside the transaction (BEGIN IMMEDIATE), so producers in any
    number of processes never collide; a batch is all or nothing, and a failed one raises
    DeliveryFailed for every record of it.
    """

    def __init__(self, bus: SqliteEventBus) -> None:
        super().__init__()
        self._auto_create_partitions = bus.auto_create_partitions
        self._retention = bus.retention
        self._conn = bus.connect()
        # Serialises use of the connection; a batch's offsets come from one transaction.
        self._lock = threading.Lock()
        self._partition_counts: dict[str, int] = {}
        self._round_robin: dict[str, int] = {}
        self._closed = False
        self._next_retention_at = time.monotonic() + self._retention.check_interval_s

    def _partition_count(self, topic: str) -> int:
        """Under self._lock: the topic's partitions, creating the topic if auto-creation is on."""
        count = self._partition_counts.get(topic)
        if count is None:
            count = _partitions_for(self._conn, topic)
            if count is None:
                if self._auto_create_partitions is None:
                    raise NotFound(f"no topic {topic!r} (auto-creation is off)")
                count = _create_topic(self._conn, topic, self._auto_create_partitions)
            # Partition counts never change, so the cache never goes stale.
            self._partition_counts[topic] = count
        return count

    def _partition(self, record: ProducerRecord) -> int:
        partitions = self._partition_count(record.topic)
        if record.key is None:
            # Keyless records: round-robin, so partitions fill evenly.
            partition = self._round_robin.get(record.topic, 0) % partitions
            self._round_robin[record.topic] = partition + 1
            return partition
        return _cached_partition_for_key(record.key, partitions)

    def check_topic(self, topic: str) -> None:
        with self._lock:
            self._check_open()
            self._partition_count(topic)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("producer is closed")

    def send_batch(self, records: Sequence[ProducerRecord], timeout_s: float | None = None) -> None:
        if not records:
            return
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        if not self._lock.acquire(timeout=-1 if timeout_s is None else max(0.0, timeout_s)):
            raise DeliveryFailed("timed out waiting for another batch", range(len(records)))
        try:
            self._check_open()
            try:
                placed = [(record, self._partition(record)) for record in records]
                _write_transaction(
                    self._conn, lambda c: _append(c, placed, _now_ms()), deadline, "append records"
                )
            except (sqlite3.Error, SnapLearnError) as exc:
                # The type only: a message could quote a payload (student data).
                raise DeliveryFailed(
                    f"batch not written ({type(exc).__name__})", range(len(records))
                ) from exc
            if self._retention.enabled and time.monotonic() >= self._next_retention_at:
                self._next_retention_at = time.monotonic() + self._retention.check_interval_s
                try:
                    _enforce_retention(self._conn, self._retention, _now_ms())
                except sqlite3.Error:
                    log.exception("event bus retention failed")
        finally:
            self._lock.release()

    def close(self) -> None:
        if self._closed:
            return
        try:
            self.flush()
        finally:
            with self._lock:
                self._closed = True
                self._conn.close()


# ---------------------------------------------------------------------------------------
# Consumer.


def assign_round_robin(
    members: Sequence[tuple[str, frozenset[str]]], partition_counts: Mapping[str, int]
) -> dict[str, set[TopicPartition]]:
    """Kafka's RoundRobinAssignor: sorted partitions dealt in turn to sorted members.

    A partition goes to the next member (cyclically) that subscribes to its topic.
    Every member computes this from the same table rows, so all agree.
    """
    ordered = sorted(members)
    assignment: dict[str, set[TopicPartition]] = {member_id: set() for member_id, _ in ordered}
    if not ordered:
        return assignment
    subscribed = set().union(*(topics for _, topics in ordered))
    tps = sorted(
        TopicPartition(topic, p)
        for topic in subscribed
        if topic in partition_counts
        for p in range(partition_counts[topic])
    )
    cursor = 0
    for tp in tps:
        for step in range(len(ordered)):
            member_id, topics = ordered[(cursor + step) % len(ordered)]
            if tp.topic in topics:
                assignment[member_id].add(tp)
                cursor = (cursor + step + 1) % len(ordered)
                break
    return assignment


@dataclass(frozen=True, slots=True)
class _GroupState:
    owned: set[TopicPartition]
    generation: int
    rejoined: bool
    committed: dict[TopicPartition, int]
    end_offsets: dict[TopicPartition, int]
    missing_topics: set[str]


class SqliteConsumer(Consumer):
    """One member of a consumer group; used by one thread.

    Joins the group on its first poll; every poll heartbeats (at most every
    session_timeout/3) and follows membership changes. A partition assigned to it starts
    at the group's committed offset, else at `auto_offset_reset`. Uncommitted progress on a
    partition it loses is redelivered to the next owner (at-least-once).
    """

    # Waiting in poll: check for new commits after these sleeps (doubling); a check is a
    # PRAGMA data_version, a read of the shared-memory WAL index, cheap enough to repeat this
    # often, which keeps the delivery latency of an idle consumer low.
    _WAIT_MIN_S = 0.0002
    _WAIT_MAX_S = 0.003

    def __init__(
        self, bus: SqliteEventBus, group_id: str, topics: Sequence[str], auto_offset_reset: OffsetReset
    ):
        if not group_id:
            raise InvalidInput("group_id must not be empty")
        if isinstance(topics, str):
            raise InvalidInput("topics must be a sequence of topic names, not one string")
        if not topics:
            raise InvalidInput("a consumer needs at least one topic")
        for topic in topics:
            _validate_topic_name(topic)
        self.group_id = group_id
        self.topics = frozenset(topics)
        self.member_id = f"{uuid.uuid4().hex[:12]}-{os.getpid()}"
        self._auto_offset_reset = auto_offset_reset
        self._session_ms = int(bus.session_timeout_s * 1000)
        self._heartbeat_interval_s = bus.session_timeout_s / 3
        self._conn = bus.connect()
        self._positions: dict[TopicPartition, int] = {}
        self._pending_seeks: dict[TopicPartition, int] = {}
        self._joined = False
        self._generation = -1
        self._missing_topics: set[str] = set(self.topics)
        self._next_heartbeat_at = 0.0
        self._data_version = -1
        self._round_robin = 0
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("consumer is closed")

    # -- group membership ----------------------------------------------------------------

    def _group_transaction(self, c: sqlite3.Connection) -> _GroupState:
        now = _now_ms()
        group = self.group_id
        rejoined = False
        updated = c.execute(
            "UPDATE members SET heartbeat_ms = ? WHERE group_id = ? AND member_id = ?",
            (now, group, self.member_id),
        ).rowcount
        changed = False
        if updated == 0:
            # First join, or we were evicted (did not poll within the session timeout).
            c.execute(
                "INSERT INTO members (group_id, member_id, topics, heartbeat_ms) VALUES (?, ?, ?, ?)",
                (group, self.member_id, ",".join(sorted(self.topics)), now),
            )
            rejoined = self._joined
            changed = True
        expired = [
            str(row[0])
            for row in c.execute(
                "SELECT member_id FROM members WHERE group_id = ? AND heartbeat_ms < ?",
                (group, now - self._session_ms),
            ).fetchall()
        ]
        if expired:
            log.info("consumer group %s: evicting %d expired member(s)", group, len(expired))
            c.executemany(
                "DELETE FROM members WHERE group_id = ? AND member_id = ?", [(group, m) for m in expired]
            )
            c.executemany(
                "DELETE FROM owners WHERE group_id = ? AND member_id = ?", [(group, m) for m in expired]
            )
            changed = True
        members = [
            (str(member_id), frozenset(str(topics).split(",")))
            for member_id, topics in c.execute(
                "SELECT member_id, topics FROM members WHERE group_id = ?", (group,)
            ).fetchall()
        ]
        all_topics = set().union(*(topics for _, topics in members))
        partition_counts: dict[str, int] = {}
        for topic in all_topics:
            row = c.execute("SELECT partitions FROM topics WHERE name = ?", (topic,)).fetchall()
            if row:
                partition_counts[topic] = int(row[0][0])
        desired = assign_round_robin(members, partition_counts)[self.member_id]
        owners = {
            TopicPartition(str(t), int(p)): str(m)
            for t, p, m in c.execute(
                "SELECT topic, partition, member_id FROM owners WHERE group_id = ?", (group,)
            ).fetchall()
        }
        mine = {tp for tp, member in owners.items() if member == self.member_id}
        release = mine - desired
        if release:
            c.executemany(
                "DELETE FROM owners WHERE group_id = ? AND topic = ? AND partition = ?",
                [(group, tp.topic, tp.partition) for tp in release],
            )
            changed = True
        claim = {tp for tp in desired - mine if tp not in owners}
        if claim:
            c.executemany(
                "INSERT INTO owners (group_id, topic, partition, member_id) VALUES (?, ?, ?, ?)",
                [(group, tp.topic, tp.partition, self.member_id) for tp in claim],
            )
            changed = True
        if changed:
            c.execute(
                "INSERT INTO groups (group_id, generation) VALUES (?, 1) "
                "ON CONFLICT (group_id) DO UPDATE SET generation = generation + 1",
                (group,),
            )
        row = c.execute("SELECT generation FROM groups WHERE group_id = ?", (group,)).fetchall()
        generation = int(row[0][0]) if row else 0
        owned = (mine - release) | claim
        fresh = owned if rejoined else owned - set(self._positions)
        committed: dict[TopicPartition, int] = {}
        end_offsets: dict[TopicPartition, int] = {}
        for tp in fresh:
            found = c.execute(
                'SELECT "offset" FROM offsets WHERE group_id = ? AND topic = ? AND partition = ?',
                (group, tp.topic, tp.partition),
            ).fetchall()
            if found:
                committed[tp] = int(found[0][0])
            end = c.execute(
                "SELECT next_offset FROM partitions WHERE topic = ? AND partition = ?",
                (tp.topic, tp.partition),
            ).fetchall()
            end_offsets[tp] = int(end[0][0])
        return _GroupState(
            owned, generation, rejoined, committed, end_offsets, set(self.topics) - partition_counts.keys()
        )

    def _maintain_group(self) -> None:
        state = _write_transaction(self._conn, self._group_transaction, None, "consumer group heartbeat")
        self._joined = True
        self._generation = state.generation
        self._missing_topics = state.missing_topics
        self._next_heartbeat_at = time.monotonic() + self._heartbeat_interval_s
        if state.rejoined:
            log.warning(
                "consumer group %s: member %s was evicted and rejoined", self.group_id, self.member_id
            )
            self._positions.clear()
        for tp in set(self._positions) - state.owned:
            del self._positions[tp]
        for tp in state.owned - set(self._positions):
            if tp in self._pending_seeks:
                self._positions[tp] = self._pending_seeks.pop(tp)
            elif tp in state.committed:
                self._positions[tp] = state.committed[tp]
            elif self._auto_offset_reset == "latest":
                self._positions[tp] = state.end_offsets[tp]
            else:
                self._positions[tp] = 0  # earliest; retention may have trimmed it, reads skip ahead

    def _database_changed(self) -> bool:
        """True when another connection committed since the last call (cheap: no table read)."""
        version = int(self._conn.execute("PRAGMA data_version").fetchall()[0][0])
        changed = version != self._data_version
        self._data_version = version
        return changed

    def _group_needs_attention(self) -> bool:
        if not self._joined or time.monotonic() >= self._next_heartbeat_at:
            return True
        row = self._conn.execute(
            "SELECT generation FROM groups WHERE group_id = ?", (self.group_id,)
        ).fetchall()
        if (int(row[0][0]) if row else 0) != self._generation:
            return True
        if self._missing_topics:
            placeholders = ",".join("?" * len(self._missing_topics))
            found = self._conn.execute(
                f"SELECT 1 FROM topics WHERE name IN ({placeholders}) LIMIT 1", tuple(self._missing_topics)
            ).fetchall()
            return bool(found)
        return False

    # -- reading -------------------------------------------------------------------------

    def _fetch(self, max_records: int) -> list[Record]:
        records: list[Record] = []
        tps = sorted(self._positions)
        if not tps:
            return records
        # Start at a rotating partition so that one busy partition cannot starve the others.
        start = self._round_robin % len(tps)
        self._round_robin += 1
        for tp in tps[start:] + tps[:start]:
            budget = max_records - len(records)
            if budget <= 0:
                break
            rows = self._conn.execute(
                'SELECT "offset", key, value, headers, timestamp_ms FROM records '
                'WHERE topic = ? AND partition = ? AND "offset" >= ? ORDER BY "offset" LIMIT ?',
                (tp.topic, tp.partition, self._positions[tp], budget),
            ).fetchall()
            for offset, key, value, headers, timestamp_ms in rows:
                records.append(
                    Record(
                        tp.topic,
                        tp.partition,
                        int(offset),
                        key,
                        value,
                        decode_headers(headers),
                        int(timestamp_ms),
                    )
                )
            if rows:
                self._positions[tp] = int(rows[-1][0]) + 1
        return records

    def _poll_once(self, max_records: int) -> list[Record]:
        if self._group_needs_attention():
            self._maintain_group()
        return self._fetch(max_records)

    def poll(self, max_records: int = 500, timeout_s: float = 1.0) -> list[Record]:
        self._check_open()
        if max_records < 1:
            raise InvalidInput("max_records must be at least 1")
        deadline = time.monotonic() + max(0.0, timeout_s)
        self._database_changed()  # sample before reading, so that later commits are noticed
        records = _retry_busy(lambda: self._poll_once(max_records), deadline, "poll")
        wait_s = self._WAIT_MIN_S
        while not records:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return records
            time.sleep(min(wait_s, remaining))
            wait_s = min(wait_s * 2, self._WAIT_MAX_S)
            heartbeat_due = time.monotonic() >= self._next_heartbeat_at
            if _retry_busy(self._database_changed, deadline, "poll") or heartbeat_due:
                records = _retry_busy(lambda: self._poll_once(max_records), deadline, "poll")
        return records

    # -- offsets -------------------------------------------------------------------------

    def commit(self, offsets: Mapping[TopicPartition, int] | None = None) -> None:
        """Store next-offset-to-read per partition.

        With None, commits the positions of the partitions this member still owns in the
        group table: a member that was evicted (a "zombie") cannot overwrite the progress
        of the partition's new owner. Explicit offsets are stored as given.
        """
        self._check_open()
        only_owned = offsets is None
        to_commit = dict(self._positions if offsets is None else offsets)
        for tp, offset in to_commit.items():
            if offset < 0:
                raise InvalidInput(f"cannot commit a negative offset ({offset}) for {tp}")
        if not to_commit:
            return

        def body(c: sqlite3.Connection) -> None:
            items = to_commit
            if only_owned:
                owned = {
                    TopicPartition(str(t), int(p))
                    for t, p in c.execute(
                        "SELECT topic, partition FROM owners WHERE group_id = ? AND member_id = ?",
                        (self.group_id, self.member_id),
                    ).fetchall()
                }
                lost = set(items) - owned
                if lost:
                    log.warning(
                        "consumer group %s: not committing %d partition(s) no longer owned",
                        self.group_id,
                        len(lost),
                    )
                items = {tp: offset for tp, offset in items.items() if tp in owned}
            now = _now_ms()
            c.executemany(
                'INSERT INTO offsets (group_id, topic, partition, "offset", updated_ms) '
                "VALUES (?, ?, ?, ?, ?) "
                'ON CONFLICT (group_id, topic, partition) DO UPDATE SET "offset" = excluded."offset", '
                "updated_ms = excluded.updated_ms",
                [(self.group_id, tp[0], tp[1], offset, now) for tp, offset in items.items()],
            )

        _write_transaction(self._conn, body, None, "commit offsets")

    def committed(self, tp: TopicPartition) -> int | None:
        self._check_open()
        rows = _retry_busy(
            lambda: self._conn.execute(
                'SELECT "offset" FROM offsets WHERE group_id = ? AND topic = ? AND partition = ?',
                (self.group_id, tp[0], tp[1]),
            ).fetchall(),
            None,
            "read committed offset",
        )
        return int(rows[0][0]) if rows else None

    def seek(self, tp: TopicPartition, offset: int) -> None:
        """Next poll of tp starts at offset; for a partition not (yet) assigned, applies when it is."""
        self._check_open()
        tp = TopicPartition(tp[0], tp[1])
        if tp.topic not in self.topics:
            raise InvalidInput(f"cannot seek {tp}: this consumer does not subscribe to {tp.topic!r}")
        if offset < 0:
            raise InvalidInput(f"cannot seek to a negative offset ({offset})")
        if tp in self._positions:
            self._positions[tp] = offset
        else:
            self._pending_seeks[tp] = offset

    def assignment(self) -> set[TopicPartition]:
        return set(self._positions)

    def end_offsets(self, tps: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        self._check_open()
        return _end_offsets(self._conn, tps)

    def close(self) -> None:
        """Leave the group at once (its partitions move without waiting for the session timeout)."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._joined:

                def leave(c: sqlite3.Connection) -> None:
                    c.execute(
                        "DELETE FROM members WHERE group_id = ? AND member_id = ?",
                        (self.group_id, self.member_id),
                    )
                    c.execute(
                        "DELETE FROM owners WHERE group_id = ? AND member_id = ?",
                        (self.group_id, self.member_id),
                    )
                    c.execute(
                        "UPDATE groups SET generation = generation + 1 WHERE group_id = ?", (self.group_id,)
                    )

                _write_transaction(self._conn, leave, time.monotonic() + 5.0, "leave consumer group")
        except sqlite3.Error:
            log.warning(
                "consumer group %s: could not leave cleanly; the session timeout will evict it", self.group_id
            )
        finally:
            self._positions.clear()
            self._conn.close()
