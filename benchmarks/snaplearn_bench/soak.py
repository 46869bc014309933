"""Soak: the whole pipeline at a fraction of its capacity for a long time, watching for leaks and losses.

    python benchmarks/soak.py --minutes 30 --warmup-minutes 5 --capacity-seconds 30
    python benchmarks/soak.py --minutes 10 --capacity 40      # skip the capacity measurement

It starts the vision server and the recommender as processes, like `make up` (the embedded bus,
or Kafka with --kafka-bootstrap), lowers its own priority (--generator-nice: it is the callers,
which in service run elsewhere), and then:

1. capacity: a closed loop of --concurrency Classify callers for --capacity-seconds (unless
   --capacity gives it), its goodput is the capacity;
2. soak: an open loop of Classify calls at --fraction of that rate for --minutes, on a fixed
   schedule, every call counted by its status (a call with no answer past its deadline as
   NO_ANSWER, a client-side failure as CLIENT_ERROR); every --sample-interval seconds, from a
   task of its own so that a slow look never holds calls back into a burst: the RSS and CPU
   of each process (the servers with their child processes, and this load generator), the
   machine's load, the generator's worst lateness, the events the vision server has published
   (its /metrics) and the events the model has applied (Recommend's events_applied);
3. drain: after the load, until the model has applied every published event (or --drain-timeout);
   then the vision server's own refusals by reason (snaplearn_vision_rejections), which say
   where a RESOURCE_EXHAUSTED came from (queue full, deadline the queue would outlast, ...).

Verdict (each target is checked and printed, and the exit status is 1 if one is missed): RSS
growth of every process below --max-rss-growth from the end of --warmup-minutes to the end of
the run (each end the mean of its --rss-window samples, so one sample's noise does not decide),
no call answered other than OK, and events applied = events published = calls answered OK.
The warm-up must cover what fills up by design: the recommender keeps the ids of the events it
applied in a bounded dedupe window (the model parameter dedupe_window), so its RSS rises until
that many events have been applied, then stays flat. `--from-json` judges a saved run again
(e.g. with a longer warm-up) without running it.

A run writes docs/benchmarks/soak.md and soak.json (unless --out / --json say elsewhere) and
prints the row for docs/BENCHMARKS.md. The capacity is the capacity seen at the start of the
run: on a machine shared with other work the soak's rate can exceed what is left later, and the
vision server then refuses (its queue fills); the page's load and CPU columns show when.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from snaplearn_bench.cpu import descendant_pids, process_tree_cpu_s
from snaplearn_bench.load import photos
from snaplearn_bench.models import ensure_default_model
from snaplearn_bench.paths import DOCS, MODELS_DIR, log
from snaplearn_bench.processes import bus_flags, recommender_process, scratch_dir, vision_server_process
from snaplearn_bench.pyloadgen import closed_loop, grpc_caller

LOAD_GENERATOR = "load generator"


# -- what is measured ---------------------------------------------------------------------------


@dataclass
class Sample:
    """One look at the system, `t_s` seconds into the soak."""

    t_s: float
    rss_bytes: dict[str, int]  # process name -> RSS of it and its child processes
    published: int  # events the vision server's publisher had confirmed on the bus
    applied: int  # events the recommender's model had applied
    calls: int  # calls answered so far (any status)
    errors: int  # calls answered other than OK so far
    send_lag_max_ms: float = 0.0  # the generator's worst lateness against its schedule since the last sample
    cpu_s: dict[str, float] = field(default_factory=dict)  # process name -> CPU seconds so far
    load_1m: float = float("nan")  # the machine's 1-minute load average


@dataclass
class SoakResult:
    capacity_rps: float
    rate_rps: float
    minutes: float
    warmup_minutes: float
    samples: list[Sample] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)  # status name -> calls
    capacity_ok: int = 0  # OK calls of the capacity measurement (their events count too)
    published: int = 0  # after the drain
    applied: int = 0  # after the drain
    dropped: int = 0  # events the publisher counted as never delivered
    send_lag_p99_ms: float = float("nan")  # the generator's own lateness against its schedule
    send_lag_max_ms: float = float("nan")
    # The vision server's own count of what it refused, by reason (snaplearn_vision_rejections).
    rejections: dict[str, int] = field(default_factory=dict)
    capacity_given: bool = False  # --capacity said it, rather than a closed loop measuring it
    load_before: str = ""  # /proc/loadavg as the soak started and as it ended
    load_after: str = ""


# -- the report's logic (unit-tested: tests/unit/test_bench_soak.py) -----------------------------


@dataclass(frozen=True)
class RssGrowth:
    name: str
    after_warmup_mb: float
    end_mb: float
    peak_mb: float
    growth_pct: float


def rss_growth(samples: Sequence[Sample], warmup_s: float, window: int = 3) -> list[RssGrowth]:
    """Per process: mean RSS of the first `window` samples at or after `warmup_s` against the mean
    of the last `window` samples, as a percentage; the peak over the whole run."""
    after = [s for s in samples if s.t_s >= warmup_s]
    if not after:
        raise ValueError(f"no sample at or after the warm-up ({warmup_s:.0f} s): run longer")
    names = sorted({name for s in samples for name in s.rss_bytes})
    rows = []
    for name in names:
        start = [s.rss_bytes[name] for s in after[:window] if name in s.rss_bytes]
        end = [s.rss_bytes[name] for s in after[-window:] if name in s.rss_bytes]
        peak = max(s.rss_bytes.get(name, 0) for s in samples)
        if not start or not end:
            continue
        base, last = statistics.fmean(start), statistics.fmean(end)
        rows.append(
            RssGrowth(
                name, base / 2**20, last / 2**20, peak / 2**20, (last - base) / base * 100 if base else 0.0
            )
        )
    return rows


@dataclass(frozen=True)
class Check:
    what: str
    target: str
    seen: str
    ok: bool


def checks(result: SoakResult, max_rss_growth_pct: float, window: int = 3) -> list[Check]:
    """Each of the soak's targets, met or not."""
    growth = rss_growth(result.samples, result.warmup_minutes * 60, window)
    ok_calls = result.statuses.get("OK", 0) + result.capacity_ok
    errors = {status: n for status, n in result.statuses.items() if status != "OK"}
    found = [
        Check(
            f"RSS growth after warm-up, {row.name}",
            f"< {max_rss_growth_pct:g} %",
            f"{row.growth_pct:+.1f} %",
            row.growth_pct < max_rss_growth_pct,
        )
        for row in growth
    ]
    found.append(
        Check(
            "calls not answered OK",
            "0",
            ", ".join(f"{status} {n}" for status, n in sorted(errors.items())) or "0",
            not errors,
        )
    )
    found.append(
        Check(
            "events published = calls answered OK",
            str(ok_calls),
            str(result.published),
            result.published == ok_calls,
        )
    )
    found.append(
        Check(
            "events applied = events published (none lost, none twice)",
            str(result.published),
            str(result.applied),
            result.applied == result.published,
        )
    )
    found.append(Check("events dropped by the publisher", "0", str(result.dropped), result.dropped == 0))
    return found


def cores_used(samples: Sequence[Sample]) -> list[dict[str, float]]:
    """Per sample, the cores each process used since the sample before (the first: none)."""
    used: list[dict[str, float]] = [{}]
    for before, after in itertools.pairwise(samples):
        seconds = after.t_s - before.t_s
        used.append(
            {
                name: (after.cpu_s[name] - before.cpu_s[name]) / seconds
                for name in after.cpu_s
                if name in before.cpu_s and seconds > 0
            }
        )
    return used


def _statuses(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{status} {n}" for status, n in sorted(counts.items())) or "none"


def benchmarks_row(result: SoakResult, found: Sequence[Check], when: str) -> list[str]:
    """The soak's row for docs/BENCHMARKS.md, with its header."""
    calls = sum(result.statuses.values())
    errors = {status: n for status, n in result.statuses.items() if status != "OK"}
    if errors:
        share = sum(errors.values()) / calls * 100 if calls else 0.0
        seen = f"{_statuses(errors)} ({share:.2f} %)"
        if result.rejections:
            seen += f"; server's reasons: {_statuses(result.rejections)}"
    else:
        seen = "0"
    rss = " / ".join(
        f"{c.what.removeprefix('RSS growth after warm-up, ')} {c.seen}"
        for c in found
        if c.what.startswith("RSS growth")
    )
    lost = result.published - result.applied
    return [
        "| run | minutes (warm-up) | capacity / soak rate | calls | errors by status | "
        "events applied of published | RSS growth after warm-up | load before / after | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {when} | {result.minutes:g} ({result.warmup_minutes:g}) | {result.capacity_rps:.0f} / "
        f"{result.rate_rps:.0f} per s | {calls:,} | {seen} | {result.applied:,} of {result.published:,} "
        f"published ({lost} lost, {result.dropped} dropped) | {rss} | "
        f"{_load(result.load_before)} / {_load(result.load_after)} | "
        f"{'PASS' if all(c.ok for c in found) else 'FAIL'} |",
    ]


def _load(loadavg: str) -> str:
    """The three load averages of a /proc/loadavg line."""
    return " ".join(loadavg.split()[:3]) or "?"


def _mb(value: int | None) -> str:
    return "" if value is None else f"{value / 2**20:.0f}"


def _spread_indexes(count: int, rows: int) -> list[int]:
    if count <= rows:
        return list(range(count))
    step = (count - 1) / (rows - 1)
    return [round(i * step) for i in range(rows)]


def spread(samples: Sequence[Sample], rows: int) -> list[Sample]:
    """At most `rows` samples, evenly spaced, the first and the last always among them."""
    return [samples[i] for i in _spread_indexes(len(samples), rows)]


def render(
    result: SoakResult,
    found: Sequence[Check],
    command: str,
    context: Mapping[str, str],
    max_rows: int = 40,
) -> str:
    """The Markdown page: the verdict, the targets, and RSS / events over time (at most
    `max_rows` of the samples, evenly spaced)."""
    passed = all(check.ok for check in found)
    names = sorted({name for s in result.samples for name in s.rss_bytes})
    lines = [
        "# Soak: the whole pipeline at a fraction of capacity",
        "",
        f"Command: `{command}`",
        "",
        ", ".join(f"{key}: {value}" for key, value in context.items()),
        "",
        f"Capacity {result.capacity_rps:.1f} Classify/s "
        f"({'given by --capacity' if result.capacity_given else 'closed loop'}), "
        f"soak at {result.rate_rps:.1f}/s "
        f"for {result.minutes:g} min, warm-up {result.warmup_minutes:g} min; "
        f"{sum(result.statuses.values())} calls in the soak; generator lateness against its schedule "
        f"p99 {result.send_lag_p99_ms:.0f} ms, max {result.send_lag_max_ms:.0f} ms; machine load "
        f"{_load(result.load_before)} before, {_load(result.load_after)} after.",
        "",
        f"**Verdict: {'PASS' if passed else 'FAIL'}**",
        "",
        "| target | wanted | seen | met |",
        "|---|---|---|---|",
        *(f"| {c.what} | {c.target} | {c.seen} | {'yes' if c.ok else '**no**'} |" for c in found),
        "",
        f"Calls by status: {_statuses(result.statuses)}. Refused by the vision server, by its reason "
        f"(snaplearn_vision_rejections): {_statuses(result.rejections)}.",
        "",
        "## RSS, CPU and events over time",
        "",
        "Cores: CPU seconds each process used since the row before, per second. Late: the generator's "
        "worst lateness against its schedule since the row before (a late generator sends a burst).",
        "",
        "| t (s) | "
        + " | ".join(f"{name} RSS (MB)" for name in names)
        + " | "
        + " | ".join(f"{name} cores" for name in names)
        + " | load | published | applied | errors | late (ms) |",
        "|---" * (2 * len(names) + 6) + "|",
    ]
    cores = cores_used(result.samples)
    for i in _spread_indexes(len(result.samples), max_rows):
        s = result.samples[i]
        rss = " | ".join(_mb(s.rss_bytes.get(name)) for name in names)
        used = " | ".join(_cores(cores[i].get(name)) for name in names)
        lines.append(
            f"| {s.t_s:.0f} | {rss} | {used} | {_cores(s.load_1m)} | {s.published} | {s.applied} | "
            f"{s.errors} | {s.send_lag_max_ms:.0f} |"
        )
    lines.append("")
    return "\n".join(lines)


def _cores(value: float | None) -> str:
    return "" if value is None or math.isnan(value) else f"{value:.2f}"


# -- running it ----------------------------------------------------------------------------------


def rss_bytes(pid: int) -> int:
    """Resident set of `pid` and its descendants (0 once it is gone)."""
    total = 0
    for each in [pid, *descendant_pids(pid)]:
        try:
            status = Path(f"/proc/{each}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
    return total


def metric(metrics_port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as reply:
        for line in reply.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise LookupError(f"{name} not in /metrics")


def machine_load() -> str:
    """/proc/loadavg (the load averages, runnable / all tasks, the newest pid)."""
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return " ".join(f"{load:.2f}" for load in os.getloadavg())


def labelled_metric(metrics_port: int, name: str, label: str) -> dict[str, float]:
    """Every series of `name` by the value of its `label` (an absent metric: {})."""
    found: dict[str, float] = {}
    prefix = name + "{"
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as reply:
        for line in reply.read().decode().splitlines():
            if not line.startswith(prefix):
                continue
            labels, _, value = line[len(prefix) :].rpartition("} ")
            for pair in labels.split(","):
                key, _, quoted = pair.partition("=")
                if key == label:
                    found[quoted.strip('"')] = float(value)
    return found


def events_applied(target: str) -> int:
    from snaplearn_client import RecommenderClient

    with RecommenderClient(target) as client:
        return int(client.recommend("soak-probe", k=1).events_applied)


async def soak(
    vision: Any, recommender: Any, args: argparse.Namespace, capacity: float, capacity_ok: int
) -> SoakResult:
    rate = capacity * args.fraction
    result = SoakResult(capacity, rate, args.minutes, args.warmup_minutes, capacity_ok=capacity_ok)
    pids = {"vision": vision.pid, "recommender": recommender.pid, LOAD_GENERATOR: os.getpid()}
    statuses: Counter[str] = Counter()
    images = photos()
    lags: list[float] = []
    metrics_port = int(vision.info["metrics_port"])
    # The capacity measurement's refusals are not the soak's.
    refused_before = labelled_metric(metrics_port, "snaplearn_vision_rejections_total", "reason")
    result.load_before = machine_load()

    window_lag = [0.0]  # the generator's worst lateness since the last sample

    async def look(t_s: float) -> None:
        # Applied first: read the other way round, a sample could show more applied than published.
        applied = await asyncio.to_thread(events_applied, recommender.target)
        published = await asyncio.to_thread(metric, metrics_port, "snaplearn_vision_events_published_total")
        rss = {name: rss_bytes(pid) for name, pid in pids.items()}
        cpu = {name: process_tree_cpu_s(pid) for name, pid in pids.items()}
        answered = sum(statuses.values())
        worst, window_lag[0] = window_lag[0], 0.0
        sample = Sample(
            t_s,
            rss,
            int(published),
            applied,
            answered,
            answered - statuses.get("OK", 0),
            worst * 1000,
            {name: seconds for name, seconds in cpu.items() if not math.isnan(seconds)},
            os.getloadavg()[0],
        )
        result.samples.append(sample)
        log(f"t={t_s:.0f}s rss={ {k: v // 2**20 for k, v in rss.items()} } MB published={published:.0f} "
            f"applied={applied} calls={answered} errors={sample.errors} "
            f"late max={sample.send_lag_max_ms:.0f} ms load={sample.load_1m:.1f}")  # fmt: skip

    async def sampler(start: float) -> None:
        # Its own task: a slow look (a busy recommender) must not hold back the calls due
        # meanwhile and then send them in one burst the server would have to absorb.
        next_look = start
        while True:
            await look(time.monotonic() - start)
            next_look += args.sample_interval
            await asyncio.sleep(max(0.0, next_look - time.monotonic()))

    async with grpc_caller(vision.target, args.connections) as call:
        tasks: set[asyncio.Task[None]] = set()

        async def one(n: int) -> None:
            try:
                status, _ = await call(n, images[n % len(images)], args.timeout)
            except Exception as exc:  # not a gRPC status: still a call that did not succeed
                status = f"CLIENT_ERROR {type(exc).__name__}"
            statuses[status] += 1

        start = time.monotonic()
        end = start + args.minutes * 60
        sampling = asyncio.get_running_loop().create_task(sampler(start))
        n = 0
        while True:
            due = start + n / rate  # a fixed schedule: a slow answer never delays the next call
            if due >= end:
                break
            if sampling.done():
                sampling.result()  # a look that failed stops the soak now, not after --minutes
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            lag = time.monotonic() - due
            lags.append(lag)
            window_lag[0] = max(window_lag[0], lag)
            task = asyncio.get_running_loop().create_task(one(n))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            n += 1
        if tasks:
            _, unanswered = await asyncio.wait(tasks, timeout=args.timeout + 5)
            if unanswered:  # past its own deadline and still no status: counted, not forgotten
                statuses["NO_ANSWER"] += len(unanswered)
                for task in unanswered:
                    task.cancel()
        sampling.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampling
        await look(time.monotonic() - start)
    result.statuses = dict(statuses)
    result.load_after = machine_load()
    lags.sort()
    result.send_lag_p99_ms = lags[int(0.99 * (len(lags) - 1))] * 1000 if lags else float("nan")
    result.send_lag_max_ms = lags[-1] * 1000 if lags else float("nan")

    # Drain: everything published reaches the model (or the deadline says it did not).
    deadline = time.monotonic() + args.drain_timeout
    while True:
        result.published = int(metric(metrics_port, "snaplearn_vision_events_published_total"))
        result.applied = events_applied(recommender.target)
        if result.applied >= result.published or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    await asyncio.sleep(2.0)  # would anything be applied twice, or published late?
    result.published = int(metric(metrics_port, "snaplearn_vision_events_published_total"))
    result.applied = events_applied(recommender.target)
    result.dropped = int(metric(metrics_port, "snaplearn_vision_events_dropped_total"))
    rejections = labelled_metric(metrics_port, "snaplearn_vision_rejections_total", "reason")
    result.rejections = {
        reason: int(n - refused_before.get(reason, 0))
        for reason, n in rejections.items()
        if n > refused_before.get(reason, 0)
    }
    return result


async def measure_capacity(target: str, args: argparse.Namespace) -> float:
    async with grpc_caller(target, args.connections) as call:
        measured = await closed_loop(
            call, photos(), args.concurrency, 3.0, args.capacity_seconds, args.timeout
        )
    if measured.errors:
        log(f"capacity: errors {measured.errors} (not part of the soak's count)")
    return measured.throughput


def settled_published(metrics_port: int, quiet_s: float = 2.0, timeout_s: float = 60.0) -> int:
    """The publisher's confirmed count once it has stopped moving (what was sent before is on the bus)."""
    deadline = time.monotonic() + timeout_s
    last = int(metric(metrics_port, "snaplearn_vision_events_published_total"))
    while time.monotonic() < deadline:
        time.sleep(quiet_s)
        now = int(metric(metrics_port, "snaplearn_vision_events_published_total"))
        if now == last:
            return now
        last = now
    return last


def run(args: argparse.Namespace) -> SoakResult:
    models = ensure_default_model(args.models)
    topic = f"soak-{uuid.uuid4().hex[:8]}"
    backend = "kafka" if args.kafka_bootstrap else "embedded"
    with scratch_dir("soak-") as workdir:
        flags = bus_flags(backend, workdir, args.kafka_bootstrap, topic)
        with (
            vision_server_process(workdir, models, flags) as vision,
            recommender_process(workdir, workdir / "checkpoints", flags, f"soak-{topic}") as recommender,
        ):
            metrics_port = int(vision.info["metrics_port"])
            if args.generator_nice:
                # The callers run here, on the servers' machine; in service they have machines of
                # their own. Nicer than the servers (whose decode threads are niced too), their
                # CPU is not taken from the system under test; their lateness is measured.
                os.nice(args.generator_nice)
            if args.capacity:
                capacity = args.capacity
            else:
                capacity = asyncio.run(measure_capacity(vision.target, args))
                log(f"capacity {capacity:.1f} Classify/s")
            # Every OK call of the measurement (its warm-up included) published one event: the
            # soak's baseline, read once the publisher has confirmed them all.
            capacity_ok = settled_published(metrics_port)
            result = asyncio.run(soak(vision, recommender, args, capacity, capacity_ok))
            result.capacity_given = bool(args.capacity)
            return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=30.0, help="length of the soak")
    parser.add_argument(
        "--fraction", type=float, default=0.7, help="the soak's rate, as a fraction of capacity"
    )
    parser.add_argument("--capacity", type=float, default=0.0, help="Classify/s; 0: measure it first")
    parser.add_argument("--capacity-seconds", type=float, default=20.0)
    parser.add_argument("--concurrency", type=int, default=16, help="callers of the capacity measurement")
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument(
        "--generator-nice",
        type=int,
        default=10,
        help="this process (the load generator) runs this much nicer than the servers it started",
    )
    parser.add_argument("--timeout", type=float, default=10.0, help="per-call deadline, seconds")
    parser.add_argument("--warmup-minutes", type=float, default=0.0, help="0: a tenth of --minutes")
    parser.add_argument("--sample-interval", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--rss-window", type=int, default=3, help="samples averaged at each end")
    parser.add_argument("--max-rss-growth", type=float, default=5.0, help="percent")
    parser.add_argument("--drain-timeout", type=float, default=120.0)
    parser.add_argument("--models", type=Path, default=MODELS_DIR)
    parser.add_argument(
        "--kafka-bootstrap", default="", help="use this Kafka cluster instead of the embedded bus"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help=f"the Markdown page (a run's default: {DOCS / 'soak.md'})"
    )
    parser.add_argument(
        "--json", type=Path, default=None, help=f"the raw result (a run's default: {DOCS / 'soak.json'})"
    )
    parser.add_argument(
        "--from-json", type=Path, default=None, help="judge and render a result --json saved, run nothing"
    )
    return parser


def load_result(data: Mapping[str, Any]) -> SoakResult:
    """A SoakResult from what --json wrote."""
    fields = dict(data)
    samples = [Sample(**sample) for sample in fields.pop("samples", [])]
    return SoakResult(**fields, samples=samples)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 0 < args.fraction <= 1:
        raise SystemExit("--fraction must be in (0, 1]")
    if args.from_json:
        # Judge a saved run again (another warm-up or growth limit) without running it again.
        result = load_result(json.loads(args.from_json.read_text()))
        if args.warmup_minutes:
            result.warmup_minutes = args.warmup_minutes
    else:
        if not args.warmup_minutes:
            args.warmup_minutes = args.minutes / 10
        result = run(args)
        # A run's report always lands where BENCHMARKS.md links it, unless told otherwise.
        args.out = args.out or DOCS / "soak.md"
        args.json = args.json or DOCS / "soak.json"
    found = checks(result, args.max_rss_growth, args.rss_window)
    command = "python benchmarks/soak.py " + " ".join(argv if argv is not None else sys.argv[1:])
    context = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "bus": "Kafka" if args.kafka_bootstrap else "embedded (SQLite)",
        "run": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    if args.from_json:
        context["run"] = f"judged again from {args.from_json.name}"
    else:
        context["load generator"] = f"this process, nice +{args.generator_nice} against the servers"
    page = render(result, found, command.strip(), context)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(page)
        log(f"wrote {args.out}")
    if args.json and not args.from_json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(asdict(result), indent=1))
        log(f"wrote {args.json}")
    for check in found:
        print(f"{'ok  ' if check.ok else 'FAIL'} {check.what}: wanted {check.target}, seen {check.seen}")
    print("\nFor docs/BENCHMARKS.md (command: " + command.strip() + "):")
    print("\n".join(benchmarks_row(result, found, context["run"])))
    return 0 if all(check.ok for check in found) else 1
