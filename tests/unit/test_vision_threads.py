"""benchmarks/vision_threads.py: threads named from py-spy's dump, CPU read per thread and child."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
import vision_threads  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)


def test_py_spy_dump_lines_give_native_ids_and_names() -> None:
    dump = (
        "Process 31503: python -m snaplearn_vision.main\n"
        'Thread 31503 (idle): "MainThread"\n'
        "    select (selectors.py:468)\n"
        'Thread 31526 (active): "vision-decode_0"\n'
        'Thread 31528 (idle): "model worksheet-topics:1-compute_0"\n'
    )
    assert vision_threads.parse_py_spy_dump(dump) == {
        31503: "MainThread",
        31526: "vision-decode_0",
        31528: "model worksheet-topics:1-compute_0",
    }


def test_cpu_is_read_per_named_thread_and_per_child_process() -> None:
    stop = threading.Event()
    worker = threading.Thread(target=stop.wait, name="test-idle-thread")
    worker.start()
    child = subprocess.Popen(
        [sys.executable, "-m", "snaplearn_vision.decode_process"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert worker.native_id is not None
        names = {threading.main_thread().native_id or 0: "MainThread", worker.native_id: "test-idle-thread"}
        spent = vision_threads.thread_cpu(os.getpid(), names)
    finally:
        stop.set()
        worker.join()
        assert child.stdin is not None
        child.stdin.close()
        child.wait(timeout=30)
    assert spent["MainThread"] > 0.0  # this test's own thread has run
    assert spent["test-idle-thread"] >= 0.0
    assert "decode process 1: main thread" in spent
