"""CPU accounting from Linux's /proc: per process tree (a server and its worker processes) and
per thread (named from `py-spy dump` where it can), and the load generator's own CPUs.

Where /proc is missing the numbers are nan, so a report says "n/a" rather than a wrong zero.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat_cpu_s(stat: str) -> float:
    """User + system seconds from a /proc/.../stat line (fields after the command's ")")."""
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def proc_table() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU seconds so far), for every process."""
    table: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue  # ended meanwhile
        table[int(entry)] = (int(stat.rsplit(")", 1)[1].split()[1]), _stat_cpu_s(stat))
    return table


def descendant_pids(pid: int, table: dict[int, tuple[int, float]] | None = None) -> list[int]:
    """The live descendants of `pid` (worker processes), parents first."""
    table = proc_table() if table is None else table
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        children = sorted(child for child, (ppid, _) in table.items() if ppid == parent)
        found += children
        frontier += children
    return found


def process_tree_cpu_s(pid: int) -> float:
    """CPU seconds spent so far by process `pid` and its live descendants; nan where there is none."""
    table = proc_table()
    if pid not in table:
        return math.nan
    return sum(table[member][1] for member in [pid, *descendant_pids(pid, table)])


@contextlib.contextmanager
def cpu_per_image(pids: dict[str, int], into: dict[str, Any]) -> Iterator[None]:
    """Around one load run: the CPU microseconds each process tree spent per image served, into
    `into["cpu_us_per_image"]`, with the generator's own (its `generator_cpu_cores`), and the
    cores each used on average, into `into["cpu_cores"]` (under overload what the generator and
    the gateway take is the server's loss). The load's warm-up counts in the CPU and its window
    in the images, at about the same rate."""
    before = {name: process_tree_cpu_s(pid) for name, pid in pids.items()}
    started = time.monotonic()
    yield
    wall = time.monotonic() - started
    rate = into.get("throughput") or math.nan
    cores = {name: (process_tree_cpu_s(pid) - before[name]) / wall for name, pid in pids.items()}
    cores["generator"] = into.get("generator_cpu_cores", math.nan)
    into["cpu_us_per_image"] = {name: round(used / rate * 1e6, 1) for name, used in cores.items()}
    into["cpu_cores"] = {name: round(used, 3) for name, used in cores.items()}


# -- per thread -------------------------------------------------------------------------------------

_PY_SPY_THREAD = re.compile(r'Thread (?:0x[0-9a-fA-F]+ )?\(?(\d+)\)? \(\w+\)(?:: "([^"]*)")?')


def parse_py_spy_dump(dump: str) -> dict[int, str]:
    """`Thread 31503 (idle): "MainThread"` lines -> {31503: "MainThread"}."""
    return {int(tid): name for tid, name in _PY_SPY_THREAD.findall(dump) if name}


def python_thread_names(pid: int) -> dict[int, str]:
    """Native thread id -> Python thread name, from `py-spy dump` (empty if py-spy is missing)."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        return {}
    dump = subprocess.run([py_spy, "dump", "--pid", str(pid)], capture_output=True, text=True).stdout
    return parse_py_spy_dump(dump)


def python_names_in_tree(pid: int) -> dict[int, str]:
    """Python thread names of `pid` and of its descendants (worker processes), by thread id."""
    names = python_thread_names(pid)
    for child in descendant_pids(pid):
        names.update(python_thread_names(child))
    return names


def thread_cpu(pid: int, names: dict[int, str]) -> dict[str, float]:
    """Label -> CPU seconds so far, for the threads of `pid` and of its descendants (labelled
    "worker process N: ", numbered in pid order). A thread is labelled by `names` (thread ids
    are unique across processes), else by its kernel name ("native thread" for one that
    kept the interpreter's, such as OpenMP's; "main thread" for a child's own)."""
    spent: dict[str, float] = collections.defaultdict(float)
    for number, member in enumerate([pid, *descendant_pids(pid)]):
        prefix = f"worker process {number}: " if number else ""
        try:
            tids = os.listdir(f"/proc/{member}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                comm = Path(f"/proc/{member}/task/{tid}/comm").read_text().strip()
                stat = Path(f"/proc/{member}/task/{tid}/stat").read_text()
            except OSError:
                continue
            child_main = "main thread" if number and int(tid) == member else None
            name = (
                names.get(int(tid)) or child_main or ("native thread" if comm.startswith("python") else comm)
            )
            spent[prefix + name] += _stat_cpu_s(stat)
    return dict(spent)


@contextlib.contextmanager
def thread_cpu_per_image(pid: int, into: dict[str, Any]) -> Iterator[None]:
    """Around one load run of the server `pid`: CPU microseconds per image served, thread by
    thread, into `into["thread_cpu_us_per_image"]` (threads under half a microsecond left out)."""
    names = python_names_in_tree(pid)  # its threads exist once it is ready
    before = thread_cpu(pid, names)
    started = time.monotonic()
    yield
    wall = time.monotonic() - started
    names.update(python_names_in_tree(pid))  # threads started under load
    after = thread_cpu(pid, names)
    images = (into.get("throughput") or math.nan) * wall
    per_image = {label: (after[label] - before.get(label, 0.0)) / images * 1e6 for label in after}
    into["thread_cpu_us_per_image"] = {
        label: round(us, 1) for label, us in sorted(per_image.items(), key=lambda item: -item[1]) if us >= 0.5
    }


# -- the generator's CPUs ---------------------------------------------------------------------------


def cpu_list(text: str) -> frozenset[int]:
    """--generator-cpus: "0" or "0,2" -> {0} or {0, 2}."""
    try:
        cpus = frozenset(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected CPU numbers such as 0 or 0,2, got {text!r}") from None
    if not cpus:
        raise argparse.ArgumentTypeError("expected at least one CPU number")
    return cpus


def cpu_names(cpus: Any) -> str:
    """A set of CPUs as the reports write it: "0" or "0, 1"."""
    return ", ".join(str(cpu) for cpu in sorted(cpus))
