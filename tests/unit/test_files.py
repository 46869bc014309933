"""snaplearn_common.files: atomic writes and ready files."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from snaplearn_common.files import atomic_write, write_ready_file


def test_atomic_write_replaces_content_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "cursor"
    atomic_write(target, "1 8\n")
    assert target.read_text() == "1 8\n"
    atomic_write(target, b"\x00\x01", durable=False)
    assert target.read_bytes() == b"\x00\x01"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["cursor"]


def test_atomic_write_honours_mode(tmp_path: Path) -> None:
    target = tmp_path / "private"
    atomic_write(target, "x", mode=0o600)
    assert target.stat().st_mode & 0o777 == 0o600


def test_a_failed_write_keeps_the_old_content(tmp_path: Path) -> None:
    target = tmp_path / "file"
    atomic_write(target, "old")
    with pytest.raises(TypeError):
        atomic_write(target, 42)  # type: ignore[arg-type]
    assert target.read_text() == "old"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["file"]


def test_readers_never_see_half_a_file(tmp_path: Path) -> None:
    target = tmp_path / "ready.json"
    big = {"host": "127.0.0.1", "port": 1, "padding": "x" * 1_000_000}
    write_ready_file(target, big)
    seen: list[int] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            seen.append(json.loads(target.read_text())["port"])

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for port in range(2, 30):
            write_ready_file(target, {**big, "port": port})
    finally:
        stop.set()
        reader.join()
    assert seen and all(1 <= port < 30 for port in seen)  # every read parsed a whole file


def test_write_ready_file_creates_the_folder_and_writes_one_json_line(tmp_path: Path) -> None:
    target = tmp_path / "run" / "vision.ready"
    write_ready_file(target, {"host": "127.0.0.1", "port": 50051, "metrics_port": 9101, "pid": os.getpid()})
    text = target.read_text()
    assert text.endswith("\n") and text.count("\n") == 1
    assert json.loads(text) == {"host": "127.0.0.1", "port": 50051, "metrics_port": 9101, "pid": os.getpid()}
