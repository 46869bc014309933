"""Where a served photo's CPU goes, thread by thread: our server at capacity, per-thread CPU per photo.

    python benchmarks/vision_threads.py                                   # default model, ~1 minute
    python benchmarks/vision_threads.py --reps 3 --server-flags="--decoder processes"
    python benchmarks/vision_threads.py --server-flags="--workers 2 --decode-threads 1" --gateway

Runs vision_bench.py's server (the benchmark's settings: 1 torch thread, --no-publish, ...) under
its closed loop, and reads the CPU time of every thread of the server and of its child processes
(decode processes, worker processes) from /proc before and after the load. Python threads are
named with `py-spy dump` (py-spy is in the bench extra); other threads by their kernel name
(grpc's event_engine threads; "python" for a native thread such as torch's OpenMP workers).
Per photo = CPU seconds / photos served over the same span (warm-up included in both, at about
the same rate, as vision_bench.py's CPU table). Prints one JSON line per repetition and a table of
medians. Linux only.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules, run as a script
from vision_bench import (
    WARMUP_S,
    Settings,
    add_server_arguments,
    build_gateway,
    configured_max_batch_size,
    descendant_pids,
    generator_note,
    load,
    load_generator,
    log,
    our_gateway,
    our_server,
    prepare_models,
    process_tree_cpu_s,
    settings_from_args,
)

GATEWAY = "snaplearn-gateway (all its threads)"
_PY_SPY_THREAD = re.compile(r'Thread (?:0x[0-9a-fA-F]+ )?\(?(\d+)\)? \(\w+\)(?:: "([^"]*)")?')


def python_thread_names(pid: int) -> dict[int, str]:
    """Native thread id -> Python thread name, from `py-spy dump` (empty if py-spy is missing)."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        return {}
    dump = subprocess.run([py_spy, "dump", "--pid", str(pid)], capture_output=True, text=True).stdout
    return parse_py_spy_dump(dump)


def parse_py_spy_dump(dump: str) -> dict[int, str]:
    """`Thread 31503 (idle): "MainThread"` lines -> {31503: "MainThread"}."""
    return {int(tid): name for tid, name in _PY_SPY_THREAD.findall(dump) if name}


def python_names_in_tree(server_pid: int) -> dict[int, str]:
    """Thread names of the server and of its worker processes (--workers N), by thread id."""
    names = python_thread_names(server_pid)
    for pid in descendant_pids(server_pid):
        if process_label(pid) == "worker process":
            names.update(python_thread_names(pid))
    return names


def process_label(pid: int) -> str:
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return "child"
    return "decode process" if "decode_process" in command else "worker process"


def thread_cpu(server_pid: int, names: dict[int, str]) -> dict[str, float]:
    """Label -> CPU seconds so far, for the server's threads and its descendants (one label per
    child process, numbered in pid order within its kind)."""
    ticks = os.sysconf("SC_CLK_TCK")
    spent: dict[str, float] = collections.defaultdict(float)
    seen: collections.Counter[str] = collections.Counter()
    for pid in [server_pid, *descendant_pids(server_pid)]:
        prefix = ""
        if pid != server_pid:
            kind = process_label(pid)
            seen[kind] += 1
            prefix = f"{kind} {seen[kind]}: "
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                comm = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
                fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            # Python threads of the server and its worker processes are named by py-spy (thread
            # ids are unique across processes); a decode process's main thread does its work.
            child_main = "main thread" if int(tid) == pid and pid != server_pid else None
            name = names.get(int(tid)) or child_main
            label = prefix + (name or ("native thread" if comm == "python" else comm))
            spent[label] += (int(fields[11]) + int(fields[12])) / ticks
    return dict(spent)


def measure(
    root: Path, model: str, settings: Settings, max_batch_size: int | None, flags: list[str]
) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(our_server(root, model, settings, max_batch_size, flags))
        target, gateway_pid = server.target, None
        if settings.gateway is not None:
            front = stack.enter_context(our_gateway(settings, server.target))
            target, gateway_pid = front.target, front.pid
        names = python_names_in_tree(server.pid)  # its threads exist once it is ready
        before = thread_cpu(server.pid, names)
        if gateway_pid is not None:  # Go's threads are interchangeable: the process as one line
            before[GATEWAY] = process_tree_cpu_s(gateway_pid)
        started = time.monotonic()
        result = load(
            target, "grpc", "closed", settings.seconds,
            concurrency=settings.concurrency, connections=settings.connections,
        )  # fmt: skip
        wall = time.monotonic() - started
        names.update(python_names_in_tree(server.pid))  # threads started under load
        after = thread_cpu(server.pid, names)
        if gateway_pid is not None:
            after[GATEWAY] = process_tree_cpu_s(gateway_pid)
    photos = result["throughput"] * wall
    per_photo = {label: (after[label] - before.get(label, 0.0)) / photos * 1e6 for label in after}
    per_photo = {label: round(us, 1) for label, us in per_photo.items() if us >= 0.5}
    return {"model": model, "throughput": result["throughput"], "us_per_photo": per_photo}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_server_arguments(parser, seconds=8.0, max_batch_size=None)
    parser.set_defaults(models="worksheet-topics")
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--server-flags", default="", help="more server flags (space-separated)")
    parser.add_argument(
        "--gateway", action="store_true", help="load the server through snaplearn-gateway (needs Go)"
    )
    args = parser.parse_args(argv)
    gateway = build_gateway("--gateway", "or leave --gateway out") if args.gateway else None
    settings = settings_from_args(args, peers=False, perf_analyzer=None, perf_env={}, gateway=gateway)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    flags = args.server_flags.split()
    rows: dict[str, list[dict[str, Any]]] = {}
    with load_generator(args.load_generator, cpus=args.generator_cpus):
        roots = prepare_models(models)
        for model in models:
            max_batch_size = configured_max_batch_size(roots[model], model)
            for rep in range(args.reps):
                log(f"{model}: repetition {rep + 1}")
                row = measure(roots[model], model, settings, max_batch_size, flags)
                rows.setdefault(model, []).append(row)
                print(json.dumps(row), flush=True)
    extra = f", server flags {args.server_flags}" if flags else ""
    extra += ", through snaplearn-gateway" if gateway is not None else ""
    print(
        f"{args.reps} repetition(s), {settings.seconds:g} s closed loop of {settings.concurrency} "
        f"(+{WARMUP_S:g} s warm-up){extra}; medians{generator_note(args.generator_cpus)}"
    )
    for model, samples in rows.items():
        throughput = statistics.median(float(s["throughput"]) for s in samples)
        labels = {label for s in samples for label in s["us_per_photo"]}
        medians = {
            label: statistics.median(s["us_per_photo"].get(label, 0.0) for s in samples) for label in labels
        }
        print(f"\n{model}: {throughput:.0f} img/s")
        print("| thread | CPU us per photo |")
        print("|---|---:|")
        for label, us in sorted(medians.items(), key=lambda item: -item[1]):
            print(f"| {label} | {us:.0f} |")
        print(f"| **all** | **{sum(medians.values()):.0f}** |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
