"""Where our vision server's capacity goes: per-thread CPU at saturation, and 1 vs N workers.

    python benchmarks/vision_profile.py                       # default model, 2 repetitions
    python benchmarks/vision_profile.py --models mobilenet_v3_small --reps 1 --workers 3

Per model and repetition, side by side:
  one      one server process under a closed loop of --concurrency callers; the CPU each of its
           threads used during the window (from /proc/<pid>/task/*/stat), and the machine's idle
           share: a thread near 100% is a bottleneck, idle cores with no such thread point at
           the GIL (the event loop and the decode threads share one);
  workers  `--workers N` (N = --workers, default the CPU count) behind the one port, each with
           --worker-decode-threads, under the same closed loop (each caller its own connection).
Same settings and load generator as vision_bench.py. Prints JSON lines and a median table.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules, run as a script
from vision_bench import (
    Settings,
    add_server_arguments,
    configured_max_batch_size,
    load,
    load_generator,
    log,
    our_server,
    prepare_models,
    settings_from_args,
)

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def thread_ticks(pid: int) -> dict[str, int]:
    """CPU ticks (user + system) per thread of `pid`, keyed by "name/tid"."""
    ticks = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            ticks[f"{(task / 'comm').read_text().strip()}/{task.name}"] = int(fields[11]) + int(fields[12])
    return ticks


def machine_ticks() -> tuple[int, int]:
    """(idle, total) ticks of all CPUs since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return values[3] + values[4], sum(values)


def profile_one(root: Path, model: str, settings: Settings) -> dict[str, Any]:
    warmup_s = 3.0
    with our_server(root, model, settings, configured_max_batch_size(root, model)) as server:
        target, pid = server.target, server.pid
        sample: dict[str, Any] = {}

        def measure_cpu() -> None:
            time.sleep(warmup_s + 1.0)  # inside the generator's window
            before, (idle0, total0) = thread_ticks(pid), machine_ticks()
            started = time.monotonic()
            time.sleep(max(1.0, settings.seconds - 2.0))
            after, (idle1, total1) = thread_ticks(pid), machine_ticks()
            seconds = time.monotonic() - started
            # Python threads carry no OS name here: the event loop is the thread whose id is
            # the pid; the others (decode threads, the model thread, grpc's) by their id.
            busy = {
                ("event loop" if name.endswith(f"/{pid}") else name): round(
                    (after[name] - before.get(name, 0)) / CLOCK_TICKS / seconds, 2
                )
                for name in after
                if after[name] - before.get(name, 0) > 0
            }
            sample["threads_cores"] = dict(sorted(busy.items(), key=lambda item: -item[1]))
            sample["process_cores"] = round(sum(busy.values()), 2)
            sample["machine_idle_share"] = round((idle1 - idle0) / max(1, total1 - total0), 3)

        sampler = threading.Thread(target=measure_cpu)
        sampler.start()
        result = load(
            target,
            "grpc",
            "closed",
            settings.seconds,
            concurrency=settings.concurrency,
            connections=settings.connections,
        )
        sampler.join()
    return {
        "throughput": result["throughput"],
        "generator_cpu_cores": result["generator_cpu_cores"],
        **sample,
    }


def profile_workers(root: Path, model: str, settings: Settings) -> dict[str, Any]:
    max_batch_size = configured_max_batch_size(root, model)
    per_worker = dataclasses.replace(settings, decode_threads=settings.worker_decode_threads)
    with our_server(root, model, per_worker, max_batch_size, ["--workers", str(settings.workers)]) as server:
        result = load(
            server.target,
            "grpc",
            "closed",
            settings.seconds,
            concurrency=settings.concurrency,
            connections=settings.connections,
        )
    return {"throughput": result["throughput"], "generator_cpu_cores": result["generator_cpu_cores"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_server_arguments(parser, seconds=10.0, max_batch_size=None)
    parser.set_defaults(models="worksheet-topics")
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args(argv)
    settings = settings_from_args(args, peers=False, perf_analyzer=None, perf_env={})
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    rows = []
    with load_generator(args.load_generator, cpus=args.generator_cpus):
        roots = prepare_models(models)
        for model in models:
            ones, twos = [], []
            for rep in range(args.reps):
                log(f"{model}: one process (repetition {rep + 1})")
                ones.append(profile_one(roots[model], model, settings))
                print(json.dumps({"model": model, "processes": 1, **ones[-1]}), flush=True)
                log(f"{model}: {settings.workers} workers (repetition {rep + 1})")
                twos.append(profile_workers(roots[model], model, settings))
                print(json.dumps({"model": model, "workers": settings.workers, **twos[-1]}), flush=True)
            one = statistics.median(r["throughput"] for r in ones)
            two = statistics.median(r["throughput"] for r in twos)
            idle = statistics.median(r["machine_idle_share"] for r in ones)
            cores = statistics.median(r["process_cores"] for r in ones)
            rows.append((model, one, two, idle, cores, ones[0]["threads_cores"]))
    print(
        f"load generator: {args.load_generator}, concurrency {settings.concurrency}, "
        f"{args.reps} repetition(s), {settings.connections} connections, workers: "
        f"--workers {settings.workers} with {settings.worker_decode_threads} decode thread(s) each"
    )
    print(
        "| model | one process img/s | workers img/s | gain | machine idle, one process "
        "| server process, cores | busiest threads (cores, first repetition) |"
    )
    print("|---|---:|---:|---:|---:|---:|---|")
    for model, one, two, idle, process_cores, threads in rows:
        top = ", ".join(f"{name} {cores}" for name, cores in list(threads.items())[:5])
        print(
            f"| {model} | {one:.0f} | {two:.0f} | {two / one:.2f}x | {idle:.0%} | {process_cores} | {top} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
