"""DiskSpool and MemorySpool: FIFO order, acknowledgement, restart, torn writes, limits, locking."""

from __future__ import annotations

from pathlib import Path

import pytest

from snaplearn_common.eventbus.spool import MAGIC, DiskSpool, MemorySpool, SpoolFull


def records(n: int, start: int = 0) -> list[bytes]:
    return [f"record-{i:05d}".encode() * 3 for i in range(start, start + n)]


def drain(spool: DiskSpool | MemorySpool, chunk: int = 7) -> list[bytes]:
    out: list[bytes] = []
    while entries := spool.peek(chunk):
        out += [entry.payload for entry in entries]
        spool.ack(entries[-1])
    return out


def segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.seg"))


def test_fifo_across_segments_and_acknowledged_segments_are_deleted(tmp_path: Path) -> None:
    spool = DiskSpool(tmp_path, segment_bytes=256)
    for start in range(0, 60, 10):
        spool.append(records(10, start))
    assert spool.pending == 60
    assert len(segments(tmp_path)) > 3
    first = spool.peek(5)
    assert spool.peek(5) == first, "peek does not move the head"
    assert drain(spool) == records(60)
    assert spool.pending == 0
    assert len(segments(tmp_path)) <= 1
    spool.close()


def test_pending_records_survive_a_restart_and_replay_in_order(tmp_path: Path) -> None:
    spool = DiskSpool(tmp_path, segment_bytes=300)
    spool.append(records(25))
    entries = spool.peek(10)
    spool.ack(entries[-1])
    spool.close()  # as if the process stopped (or died: the cursor and segments are on disk)

    reopened = DiskSpool(tmp_path, segment_bytes=300)
    assert reopened.pending == 15
    reopened.append(records(5, 25))
    assert drain(reopened) == records(20, 10)
    reopened.close()


def test_a_torn_append_is_cut_off_on_open(tmp_path: Path) -> None:
    spool = DiskSpool(tmp_path)
    spool.append(records(3))
    spool.close()
    [segment] = segments(tmp_path)
    with segment.open("ab") as out:
        out.write(b"\x00\x00\x00\x40\x12\x34")  # a frame header cut short by a crash
    reopened = DiskSpool(tmp_path)
    assert reopened.pending == 3
    reopened.append(records(2, 3))
    assert drain(reopened) == records(5)
    reopened.close()


def test_a_checksum_mismatch_at_the_tail_is_treated_as_torn(tmp_path: Path) -> None:
    spool = DiskSpool(tmp_path)
    spool.append(records(4))
    spool.close()
    [segment] = segments(tmp_path)
    data = bytearray(segment.read_bytes())
    data[-1] ^= 0xFF  # the last record's payload no longer matches its CRC
    segment.write_bytes(bytes(data))
    reopened = DiskSpool(tmp_path)
    assert drain(reopened) == records(3)
    reopened.close()


def test_full_spool_refuses_the_whole_append(tmp_path: Path) -> None:
    spool = DiskSpool(tmp_path, segment_bytes=128, max_bytes=512)
    with pytest.raises(SpoolFull):
        for start in range(0, 100, 5):
            spool.append(records(5, start))
    kept = spool.pending
    assert 0 < kept < 100 and kept % 5 == 0
    assert drain(spool) == records(kept)
    spool.close()


def test_two_processes_cannot_share_a_spool(tmp_path: Path) -> None:
    first = DiskSpool(tmp_path)
    with pytest.raises(RuntimeError, match="in use"):
        DiskSpool(tmp_path)
    first.close()
    DiskSpool(tmp_path).close()  # free again once closed


def test_fsync_never_still_survives_reopening(tmp_path: Path) -> None:
    spool = DiskSpool(tmp_path, fsync="never")
    spool.append(records(3))
    spool.close()
    assert drain(DiskSpool(tmp_path, fsync="never")) == records(3)
    with pytest.raises(ValueError):
        DiskSpool(tmp_path / "other", fsync="sometimes")  # type: ignore[arg-type]


def test_segment_files_start_with_the_magic_and_are_private(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    spool = DiskSpool(directory)
    spool.append(records(1))
    [segment] = segments(directory)
    assert segment.read_bytes().startswith(MAGIC)
    assert directory.stat().st_mode & 0o077 == 0
    spool.close()


def test_memory_spool_is_a_bounded_fifo() -> None:
    spool = MemorySpool(max_records=10)
    spool.append(records(8))
    with pytest.raises(SpoolFull):
        spool.append(records(3, 8))
    assert drain(spool, chunk=3) == records(8)
    assert spool.pending == 0
