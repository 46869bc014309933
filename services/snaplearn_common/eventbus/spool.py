"""Spools: the FIFO an EventPublisher keeps what the bus has not confirmed yet.

`DiskSpool` is an append-only log in one directory, so that events survive a broker
outage AND a restart of the process that published them:

- segment files `<20-digit number>.seg`, each starting with MAGIC, then records framed as
  `>II` (payload length, CRC-32 of the payload) + payload; a segment is closed for
  appends at `segment_bytes` and deleted once every record in it is acknowledged;
- `cursor` holds "segment offset" of the first unacknowledged record, replaced atomically
  (files.atomic_write) on each `ack`;
- on open, a torn record at the end of the newest segment (a crash mid-append) is cut
  off; a bad record anywhere else is corruption: the rest of that segment is skipped
  and counted in `corrupt_records` (the bytes were written once and are not coming back).

fsync policy: "always" fsyncs each `append` batch and each cursor update (survives power
loss); "never" leaves it to the OS (survives a crash of the process, not of the machine).
An exclusive lock (flock) on the directory keeps two processes from sharing a spool.

`MemorySpool` has the same interface and no durability: what a publisher without a spool
directory uses. Spools are used from one thread (the publisher's drainer); the counters
may be read from any thread.
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct
import threading
import zlib
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from snaplearn_common.files import atomic_write, fsync_directory

log = logging.getLogger(__name__)

FsyncPolicy = Literal["always", "never"]
FSYNC_POLICIES: tuple[FsyncPolicy, ...] = ("always", "never")

MAGIC = b"SLSPOOL1"
_FRAME = struct.Struct(">II")  # payload length, crc32(payload)
_SEGMENT_SUFFIX = ".seg"
_CURSOR_FILE = "cursor"
_LOCK_FILE = "lock"
# A length beyond this is read as corruption rather than as an allocation request.
MAX_RECORD_BYTES = 64 * 1024 * 1024


class SpoolFull(Exception):
    """The spool has reached its size limit; the records were not added."""


@dataclass(frozen=True, slots=True)
class SpoolEntry:
    """One record read from the spool; `ack(entry)` acknowledges it and everything before it."""

    payload: bytes
    ordinal: int  # position in the FIFO since the spool was opened (0 = first unacknowledged)
    next_position: tuple[int, int]  # (segment, offset) just after this record


class Spool(ABC):
    """A FIFO of byte records: append at the tail, peek from the head, acknowledge a prefix."""

    def __init__(self) -> None:
        self._counter_lock = threading.Lock()
        self._pending = 0
        self._acked = 0  # ordinal of the first unacknowledged record

    @property
    def pending(self) -> int:
        """Records appended and not yet acknowledged."""
        with self._counter_lock:
            return self._pending

    @abstractmethod
    def append(self, payloads: Sequence[bytes]) -> None:
        """Add records at the tail, all or none (SpoolFull when over the limit)."""

    @abstractmethod
    def peek(self, max_records: int) -> list[SpoolEntry]:
        """Up to max_records records from the head, oldest first; the head does not move."""

    @abstractmethod
    def ack(self, entry: SpoolEntry) -> None:
        """Drop everything up to and including `entry` (from the latest peek)."""

    def close(self) -> None:  # noqa: B027  (optional hook)
        """Release resources; what is pending stays (on disk, for DiskSpool)."""

    def _count_appended(self, count: int) -> None:
        with self._counter_lock:
            self._pending += count

    def _count_acked(self, entry: SpoolEntry) -> int:
        with self._counter_lock:
            count = entry.ordinal + 1 - self._acked
            if count <= 0:
                return 0
            self._acked += count
            self._pending -= count
            return count


class MemorySpool(Spool):
    """A bounded in-memory FIFO (no durability); `max_records` bounds it."""

    def __init__(self, max_records: int = 100_000) -> None:
        super().__init__()
        self.max_records = max_records
        self._records: deque[bytes] = deque()

    def append(self, payloads: Sequence[bytes]) -> None:
        if len(self._records) + len(payloads) > self.max_records:
            raise SpoolFull(f"memory spool full ({self.max_records} records)")
        self._records.extend(payloads)
        self._count_appended(len(payloads))

    def peek(self, max_records: int) -> list[SpoolEntry]:
        count = min(max_records, len(self._records))
        return [SpoolEntry(self._records[i], self._acked + i, (0, 0)) for i in range(count)]

    def ack(self, entry: SpoolEntry) -> None:
        for _ in range(self._count_acked(entry)):
            self._records.popleft()


class DiskSpool(Spool):
    """Append-only segment files in `directory` (see the module docstring)."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        fsync: FsyncPolicy = "always",
        segment_bytes: int = 16 * 1024 * 1024,
        max_bytes: int = 1024 * 1024 * 1024,
    ) -> None:
        super().__init__()
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync must be one of {', '.join(FSYNC_POLICIES)}, got {fsync!r}")
        if segment_bytes < len(MAGIC) + _FRAME.size + 1 or max_bytes < segment_bytes:
            raise ValueError("segment_bytes must hold a record, and max_bytes at least one segment")
        self.directory = Path(directory)
        self.fsync = fsync
        self.segment_bytes = segment_bytes
        self.max_bytes = max_bytes
        self.corrupt_records = 0
        # The records are events about students: readable by this user only.
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._lock_fd = os.open(self.directory / _LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise RuntimeError(f"spool {self.directory} is in use by another process") from None
        self._cursor = self._read_cursor()
        self._segments = self._recover()
        self._sizes = {number: self._segment_path(number).stat().st_size for number in self._segments}
        self._count_appended(self._count_records())
        if self.pending:
            log.info("spool %s: %d record(s) from an earlier run to replay", self.directory, self.pending)

    # -- files -------------------------------------------------------------------------

    def _segment_path(self, number: int) -> Path:
        return self.directory / f"{number:020d}{_SEGMENT_SUFFIX}"

    def _sync_directory(self) -> None:
        if self.fsync == "always":
            fsync_directory(self.directory)

    def _read_cursor(self) -> tuple[int, int]:
        try:
            segment, offset = (self.directory / _CURSOR_FILE).read_text().split()
            return int(segment), int(offset)
        except FileNotFoundError:
            return 0, len(MAGIC)
        except ValueError:
            # Only ever replaced atomically, so this is outside interference: replay from the
            # oldest segment (duplicates are absorbed downstream, losses would not be).
            log.error("spool %s: unreadable cursor; replaying every segment", self.directory)
            return 0, len(MAGIC)

    def _write_cursor(self, position: tuple[int, int]) -> None:
        atomic_write(
            self.directory / _CURSOR_FILE,
            f"{position[0]} {position[1]}\n",
            durable=self.fsync == "always",
            mode=0o600,
        )

    def _scan(
        self, number: int, start: int, max_records: int | None = None
    ) -> tuple[list[tuple[bytes, int]], int, bool]:
        """Records of one segment from `start`: ([(payload, end offset)], end of the valid part, clean).

        clean is False when a bad record (torn, or failing its checksum) stopped the scan.
        Reads only as far as it needs, so replaying a large spool chunk by chunk stays linear.
        """
        records: list[tuple[bytes, int]] = []
        with self._segment_path(number).open("rb") as segment:
            if segment.read(len(MAGIC)) != MAGIC:
                return records, len(MAGIC), False
            offset = max(start, len(MAGIC))
            segment.seek(offset)
            while max_records is None or len(records) < max_records:
                frame = segment.read(_FRAME.size)
                if not frame:
                    return records, offset, True
                if len(frame) < _FRAME.size:
                    return records, offset, False
                length, checksum = _FRAME.unpack(frame)
                if length > MAX_RECORD_BYTES:
                    return records, offset, False
                payload = segment.read(length)
                if len(payload) < length or zlib.crc32(payload) != checksum:
                    return records, offset, False
                offset += _FRAME.size + length
                records.append((payload, offset))
        return records, offset, True

    def _recover(self) -> list[int]:
        numbers = sorted(
            int(path.name[: -len(_SEGMENT_SUFFIX)])
            for path in self.directory.glob(f"*{_SEGMENT_SUFFIX}")
            if path.name[: -len(_SEGMENT_SUFFIX)].isdigit()
        )
        for number in [n for n in numbers if n < self._cursor[0]]:
            self._segment_path(number).unlink()  # fully acknowledged before a crash
        numbers = [n for n in numbers if n >= self._cursor[0]]
        if numbers:
            newest = numbers[-1]
            _, valid_end, clean = self._scan(newest, len(MAGIC))
            if not clean:
                # A crash in the middle of an append: the torn record was never acknowledged
                # to anyone (append had not returned), so cutting it off loses nothing.
                log.warning("spool %s: cutting a torn record off segment %d", self.directory, newest)
                with self._segment_path(newest).open("r+b") as segment:
                    segment.truncate(valid_end)
                    if valid_end < len(MAGIC):
                        segment.seek(0)
                        segment.write(MAGIC)
        if self._cursor[0] not in numbers:
            self._cursor = (numbers[0] if numbers else self._cursor[0], len(MAGIC))
        return numbers

    def _count_records(self) -> int:
        total = 0
        for number in self._segments:
            start = self._cursor[1] if number == self._cursor[0] else len(MAGIC)
            records, _, clean = self._scan(number, start)
            total += len(records)
            if not clean and number != self._segments[-1]:
                log.error("spool %s: segment %d is corrupt after %d records", self.directory, number, total)
        return total

    # -- the FIFO ------------------------------------------------------------------------

    @property
    def size_bytes(self) -> int:
        return sum(self._sizes.values())

    def append(self, payloads: Sequence[bytes]) -> None:
        if not payloads:
            return
        frames = b"".join(_FRAME.pack(len(p), zlib.crc32(p)) + p for p in payloads)
        if self.size_bytes + len(frames) > self.max_bytes:
            raise SpoolFull(f"spool {self.directory} is full ({self.max_bytes} bytes)")
        if not self._segments or self._sizes[self._segments[-1]] >= self.segment_bytes:
            number = (self._segments[-1] + 1) if self._segments else self._cursor[0]
            with self._segment_path(number).open("xb") as segment:
                segment.write(MAGIC)
            self._segments.append(number)
            self._sizes[number] = len(MAGIC)
            self._sync_directory()
        number = self._segments[-1]
        with self._segment_path(number).open("ab") as segment:
            segment.write(frames)
            segment.flush()
            if self.fsync == "always":
                os.fsync(segment.fileno())
        self._sizes[number] += len(frames)
        self._count_appended(len(payloads))

    def peek(self, max_records: int) -> list[SpoolEntry]:
        entries: list[SpoolEntry] = []
        ordinal = self._acked
        for number in self._segments:
            if len(entries) >= max_records:
                break
            start = self._cursor[1] if number == self._cursor[0] else len(MAGIC)
            records, _, clean = self._scan(number, start, max_records - len(entries))
            for payload, end in records:
                entries.append(SpoolEntry(payload, ordinal, (number, end)))
                ordinal += 1
            if not clean and number != self._segments[-1]:
                # Corrupt tail of a closed segment: skip to the next segment.
                self.corrupt_records += 1
                log.error("spool %s: skipping the corrupt rest of segment %d", self.directory, number)
        return entries

    def ack(self, entry: SpoolEntry) -> None:
        if self._count_acked(entry) == 0:
            return
        segment, offset = entry.next_position
        if offset >= self._sizes.get(segment, 0) and segment != self._segments[-1]:
            segment, offset = segment + 1, len(MAGIC)  # that segment is done
        self._write_cursor((segment, offset))
        self._cursor = (segment, offset)
        while self._segments and self._segments[0] < segment:
            done = self._segments.pop(0)
            self._sizes.pop(done, None)
            self._segment_path(done).unlink(missing_ok=True)

    def close(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1
