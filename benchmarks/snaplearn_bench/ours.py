"""Our vision server (and the gateway in front of it) under the benchmark's load: the settings
every vision scenario takes, and one measurement of a configuration (`bench_ours`)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from snaplearn_bench import cpu
from snaplearn_bench.load import LOAD_GENERATORS, WARMUP_S, load
from snaplearn_bench.models import DEFAULT_MODEL
from snaplearn_bench.paths import PY
from snaplearn_bench.processes import (
    free_port,
    gateway_binary,
    process,
    ready_file_process,
    torch_env,
)
from snaplearn_bench.split import client_layer, split
from snaplearn_common.metrics import scrape

# The gateway's connections to our server: with worker processes behind one port the kernel
# spreads connections, so more reach every worker (the gateway then sends each worker's items on
# one of them, DECISIONS D22).
GATEWAY_BACKEND_CONNECTIONS = 16
# Go's GC target for the gateway: its default since DECISIONS D24, passed explicitly so that
# the report can say what ran (an experiment's own --gc-percent, given after it, wins).
GATEWAY_GC_PERCENT = 400


@dataclasses.dataclass
class Settings:
    seconds: float
    concurrency: int
    torch_threads: int
    decode_threads: int
    max_queue_size: int
    max_batch_size: int | None
    max_queue_delay_ms: float
    peers: bool
    perf_analyzer: Path | None
    perf_env: dict[str, str]
    connections: int = 64
    workers: int = 2
    worker_decode_threads: int = 1
    gateway: Path | None = None  # the snaplearn-gateway binary; None: that configuration is skipped
    gateway_max_in_flight: int = 128
    triton_python: Path | None = None  # the PyTriton venv's python; None: Triton is not run
    triton_env: dict[str, str] = dataclasses.field(default_factory=dict)


def add_server_arguments(parser: argparse.ArgumentParser, seconds: float, max_batch_size: int | None) -> None:
    """The models, load and server settings every vision scenario takes."""
    parser.add_argument("--models", default=f"mobilenet_v3_small,{DEFAULT_MODEL}")
    parser.add_argument("--seconds", type=float, default=seconds, help="measurement window per load phase")
    parser.add_argument("--concurrency", type=int, default=64)
    # One intra-op thread: with two, every OpenMP barrier waits for a thread descheduled by the
    # other work on a shared machine (DECISIONS D13).
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--decode-threads", type=int, default=2)
    parser.add_argument("--max-queue-size", type=int, default=256)
    parser.add_argument(
        "--max-batch-size",
        type=int,
        default=max_batch_size,
        help="for every server (default: %(default)s; None = the model's configured max batch size)",
    )
    parser.add_argument("--max-queue-delay-ms", type=float, default=5.0, help="for every server")
    parser.add_argument(
        "--connections",
        type=int,
        default=64,
        help="gRPC connections of the load generator: a closed loop's caller keeps one (one phone "
        "each), an open loop's requests take them in turn (default: %(default)s)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="worker processes of our second configuration (--workers N; 1 = not measured; "
        "default: the CPU count, %(default)s)",
    )
    parser.add_argument(
        "--worker-decode-threads", type=int, default=1, help="decode threads per worker process"
    )
    parser.add_argument(
        "--generator-cpus",
        type=cpu.cpu_list,
        default=None,
        help="run the load generator alone on these CPUs (e.g. 0) and the servers, gateway, peers "
        "and raw bound on the others, as if the callers were elsewhere (default: all share all)",
    )
    parser.add_argument(
        "--load-generator",
        choices=LOAD_GENERATORS,
        default="go",
        help="go: benchmarks/loadgen, built with `go build` at the start (needs Go); "
        "python: snaplearn_bench.pyloadgen, the same semantics at about twice the CPU "
        "(default: %(default)s)",
    )


def settings_from_args(
    args: argparse.Namespace,
    peers: bool,
    perf_analyzer: Path | None,
    perf_env: dict[str, str],
    gateway: Path | None = None,
    gateway_max_in_flight: int = 128,
) -> Settings:
    return Settings(
        seconds=args.seconds,
        concurrency=args.concurrency,
        torch_threads=args.torch_threads,
        decode_threads=args.decode_threads,
        max_queue_size=args.max_queue_size,
        max_batch_size=args.max_batch_size,
        max_queue_delay_ms=args.max_queue_delay_ms,
        peers=peers,
        perf_analyzer=perf_analyzer,
        perf_env=perf_env,
        connections=args.connections,
        workers=args.workers,
        worker_decode_threads=args.worker_decode_threads,
        gateway=gateway,
        gateway_max_in_flight=gateway_max_in_flight,
    )


def generator_note(cpus: frozenset[int] | None) -> str:
    """What the scenarios print about --generator-cpus ("" without it)."""
    return f", load generator alone on CPU(s) {cpu.cpu_names(cpus)}" if cpus else ""


@dataclasses.dataclass(frozen=True)
class ExperimentSetups:
    """An experiment's server configurations: one process (`settings`) and --workers N worker
    processes (`per_worker`: --worker-decode-threads each)."""

    settings: Settings
    per_worker: Settings

    @property
    def workers_name(self) -> str:
        return f"{self.settings.workers} workers"

    @property
    def workers(self) -> tuple[Settings, list[str]]:
        """(settings, server flags) of the --workers N processes, whatever N (1 included)."""
        return self.per_worker, ["--workers", str(self.settings.workers)]

    def servers(self) -> dict[str, tuple[Settings, list[str]]]:
        """name -> (settings, server flags): "1 process", then with --workers N > 1 "N workers"."""
        servers: dict[str, tuple[Settings, list[str]]] = {"1 process": (self.settings, [])}
        if self.settings.workers > 1:
            servers[self.workers_name] = self.workers
        return servers


def experiment_setups(
    args: argparse.Namespace, gateway_hint: str | None, gateway_max_in_flight: int = 128
) -> ExperimentSetups:
    """Settings from add_server_arguments()'s `args` (no peers, no perf_analyzer) for an
    experiment. `gateway_hint`: None, no gateway; else the gateway is built (`go build`) and a
    failed build's SystemExit ends with the hint (the way around it)."""
    settings = settings_from_args(
        args,
        peers=False,
        perf_analyzer=None,
        perf_env={},
        gateway=None if gateway_hint is None else gateway_binary("--gateway", gateway_hint),
        gateway_max_in_flight=gateway_max_in_flight,
    )
    per_worker = dataclasses.replace(settings, decode_threads=settings.worker_decode_threads)
    return ExperimentSetups(settings, per_worker)


def ours_argv(
    root: Path,
    model: str,
    port: int,
    metrics_port: int,
    ready: Path,
    settings: Settings,
    max_batch_size: int | None,
) -> list[str]:
    argv = [
        PY, "-m", "snaplearn_vision.main",
        "--no-publish",  # the peers publish nothing either
        "--port", str(port),
        "--metrics-port", str(metrics_port),
        "--model-repository", str(root),
        "--model-name", model,
        "--model-version", "1",
        "--device", "cpu",
        "--torch-threads", str(settings.torch_threads),
        "--decode-threads", str(settings.decode_threads),
        "--max-queue-size", str(settings.max_queue_size),
        "--ready-file", str(ready),
        "--log-level", "WARNING",
    ]  # fmt: skip
    if max_batch_size is not None:
        argv += ["--max-batch-size", str(max_batch_size)]
    return [*argv, "--max-queue-delay-ms", str(settings.max_queue_delay_ms)]


@dataclasses.dataclass(frozen=True)
class OurServer:
    target: str
    metrics_port: int
    pid: int


@contextlib.contextmanager
def our_server(
    root: Path,
    model: str,
    settings: Settings,
    max_batch_size: int | None,
    extra: Sequence[str] = (),
    code: Path | None = None,
) -> Iterator[OurServer]:
    """Our server (`python -m snaplearn_vision.main --no-publish`) on free ports, with `extra`
    flags, until the block ends; run from the checkout at `code` if given (else this one)."""
    port, metrics_port = free_port(), free_port()
    with tempfile.TemporaryDirectory() as tmp:
        ready = Path(tmp) / "ready.json"
        argv = ours_argv(root, model, port, metrics_port, ready, settings, max_batch_size)
        env = torch_env(settings.torch_threads, code)
        with ready_file_process("vision server", [*argv, *extra], ready, Path(tmp) / "log", env) as server:
            yield OurServer(f"127.0.0.1:{port}", metrics_port, server.pid)
    time.sleep(1.0)  # let the CPU settle before the next contender


@dataclasses.dataclass(frozen=True)
class OurGateway:
    target: str
    pid: int
    metrics_port: int


@contextlib.contextmanager
def our_gateway(settings: Settings, backend: str, extra: Sequence[str] = ()) -> Iterator[OurGateway]:
    """snaplearn-gateway in front of `backend`, with `extra` flags, until the block ends."""
    assert settings.gateway is not None
    port, metrics_port = free_port(), free_port()
    argv = [
        str(settings.gateway),
        "--port", str(port),
        "--metrics-port", str(metrics_port),
        "--backend", backend,
        "--backend-connections", str(GATEWAY_BACKEND_CONNECTIONS),
        "--max-in-flight", str(settings.gateway_max_in_flight),
        "--gc-percent", str(GATEWAY_GC_PERCENT),
        *extra,
    ]  # fmt: skip
    with process(argv, {**os.environ, "GOMAXPROCS": "1"}, "gateway ready") as proc:
        yield OurGateway(f"127.0.0.1:{port}", proc.pid, metrics_port)


def batch_stats(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """Batch-size distribution, mean batch compute time and refusals between two scrapes."""

    def delta(prefix: str) -> dict[str, float]:
        return {k: after[k] - before.get(k, 0.0) for k in after if k.startswith(prefix)}

    def bound(key: str) -> str:
        return key.split('le="')[1].split('"')[0]

    sizes = delta("snaplearn_vision_batch_size_bucket")
    count = sum(delta("snaplearn_vision_batch_size_count").values())
    total = sum(delta("snaplearn_vision_batch_size_sum").values())
    compute_s = sum(delta("snaplearn_vision_batch_compute_seconds_sum").values())
    buckets: dict[str, float] = {}
    previous = 0.0
    for key in sorted(sizes, key=lambda k: float(bound(k))):  # float() reads "+Inf"
        cumulative = sizes[key]
        if cumulative - previous > 0:
            buckets[f"<={bound(key)}"] = round((cumulative - previous) / max(count, 1), 3)
        previous = cumulative
    rejections = {
        k.split('reason="')[1].split('"')[0]: v for k, v in delta("snaplearn_vision_rejections_total").items()
    }
    return {
        "batches": count,
        "mean_batch_size": total / count if count else float("nan"),
        "mean_batch_compute_ms": 1000 * compute_s / count if count else float("nan"),
        "batch_size_share": buckets,
        "rejections": {k: v for k, v in rejections.items() if v},
    }


def bench_ours(
    root: Path,
    model: str,
    settings: Settings,
    max_batch_size: int | None,
    rates: tuple[float, float] | None,
    extra: Sequence[str] = (),
    gateway: bool = False,
    gateway_extra: Sequence[str] = (),
    code: Path | None = None,
    threads: bool = False,
    perf_analyzer: Any = None,
) -> dict[str, Any]:
    """Our server (behind the gateway if `gateway`; from the checkout at `code` if given):
    capacity (closed loop, with CPU per photo per process tree, and per thread if `threads`),
    then open loops at `rates` (half, overload), or at half and 3x of the capacity just measured
    when rates is None. `perf_analyzer(target)`, if given, runs last against the same server."""
    conns = settings.connections
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(our_server(root, model, settings, max_batch_size, extra, code))
        target, metrics_port = server.target, server.metrics_port
        pids = {"server": server.pid}
        ports = {"server": metrics_port}
        if gateway:
            front = stack.enter_context(our_gateway(settings, server.target, gateway_extra))
            target, pids["gateway"], ports["gateway"] = front.target, front.pid, front.metrics_port
        closed: dict[str, Any] = {}
        result: dict[str, Any] = {"closed": closed}
        before = scrape(metrics_port)
        with contextlib.ExitStack() as accounting:
            accounting.enter_context(cpu.cpu_per_image(pids, closed))
            if threads:
                accounting.enter_context(cpu.thread_cpu_per_image(server.pid, closed))
            closed.update(
                load(
                    target,
                    "grpc",
                    "closed",
                    settings.seconds,
                    concurrency=settings.concurrency,
                    connections=conns,
                )
            )
        closed["server"] = batch_stats(before, scrape(metrics_port))
        capacity = closed["throughput"]
        half, overload = rates if rates is not None else (capacity / 2, capacity * 3)
        result["rates"] = {"half": half, "overload": overload}
        # Scraped as the generator's measured window opens (after its warm-up), so that the
        # processes' histograms cover the requests the generator's own percentiles do.
        befores: dict[str, dict[str, float]] = {}
        window_opens = threading.Timer(
            WARMUP_S, lambda: befores.update({name: scrape(port) for name, port in ports.items()})
        )
        window_opens.start()
        result["half"] = load(target, "grpc", "open", settings.seconds, rate=half, connections=conns)
        window_opens.join()
        afters = {name: scrape(port) for name, port in ports.items()}
        result["half"]["server"] = batch_stats(befores["server"], afters["server"])
        # Where the half-load latency goes, layer by layer (the p99 target is judged there).
        windows = {name: (befores[name], afters[name]) for name in ports}
        result["half"]["split"] = {"client": client_layer(result["half"]), **split(windows)}
        before = scrape(metrics_port)
        result["overload"] = {}
        with cpu.cpu_per_image(pids, result["overload"]):  # where the cores go under overload
            result["overload"].update(
                load(target, "grpc", "open", settings.seconds, rate=overload, connections=conns)
            )
        result["overload"]["server"] = batch_stats(before, scrape(metrics_port))
        if perf_analyzer is not None and max_batch_size != 1:
            result["perf_analyzer"] = perf_analyzer(target)
    return result
