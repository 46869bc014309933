"""snaplearn_bench.cpu: threads named from py-spy's dump, CPU read per thread, per child process
and per process tree (real threads and a real child process, read back from /proc)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading

import pytest

from snaplearn_bench import cpu


def test_py_spy_dump_lines_give_native_ids_and_names() -> None:
    dump = (
        "Process 31503: python -m snaplearn_vision.main\n"
        'Thread 31503 (idle): "MainThread"\n'
        "    select (selectors.py:468)\n"
        'Thread 31526 (active): "vision-decode_0"\n'
        'Thread 31528 (idle): "model worksheet-topics:1-compute_0"\n'
    )
    assert cpu.parse_py_spy_dump(dump) == {
        31503: "MainThread",
        31526: "vision-decode_0",
        31528: "model worksheet-topics:1-compute_0",
    }


def test_cpu_is_read_per_named_thread_and_per_child_process() -> None:
    stop = threading.Event()
    worker = threading.Thread(target=stop.wait, name="test-idle-thread")
    worker.start()
    # A child that has run some Python before it waits: its main thread has spent CPU.
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; sum(range(10**6)); print(flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None and worker.native_id is not None
        child.stdout.readline()
        names = {threading.main_thread().native_id or 0: "MainThread", worker.native_id: "test-idle-thread"}
        spent = cpu.thread_cpu(os.getpid(), names)
        tree = cpu.process_tree_cpu_s(os.getpid())
        assert cpu.descendant_pids(os.getpid()) == [child.pid]
    finally:
        stop.set()
        worker.join()
        assert child.stdin is not None
        child.stdin.close()
        child.wait(timeout=30)
    assert spent["MainThread"] > 0.0  # this test's own thread has run
    assert spent["test-idle-thread"] >= 0.0
    assert "worker process 1: main thread" in spent
    # The tree counts this process and its child: at least every thread's CPU read just before.
    assert tree >= sum(spent.values()) - 0.05


def test_a_process_that_is_gone_has_no_cpu_rather_than_zero() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(timeout=30)
    assert cpu.process_tree_cpu_s(child.pid) != cpu.process_tree_cpu_s(child.pid)  # nan


def test_cpu_lists_parse_or_say_what_is_expected() -> None:
    assert cpu.cpu_list("0") == {0}
    assert cpu.cpu_list("0, 2") == {0, 2}
    for bad in ("", "zero", "0-1"):
        with pytest.raises(argparse.ArgumentTypeError, match="CPU number"):
            cpu.cpu_list(bad)
    assert cpu.cpu_names({2, 0}) == "0, 2"


def test_cpu_per_image_is_split_by_thread_and_by_process_tree() -> None:
    per_thread: dict[str, object] = {"throughput": 1000.0}
    per_tree: dict[str, object] = {"throughput": 1000.0, "generator_cpu_cores": 0.25}
    with (
        cpu.thread_cpu_per_image(os.getpid(), per_thread),
        cpu.cpu_per_image({"server": os.getpid()}, per_tree),
    ):
        sum(range(3 * 10**6))  # this thread's work, inside the window
    threads = per_thread["thread_cpu_us_per_image"]
    assert isinstance(threads, dict) and threads  # the busiest first
    assert list(threads.values()) == sorted(threads.values(), reverse=True)
    assert per_tree["cpu_us_per_image"]["generator"] == 250.0  # type: ignore[index]  # 0.25 cores / 1000 img/s
    assert per_tree["cpu_cores"]["server"] > 0  # type: ignore[index]
