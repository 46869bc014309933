"""The vision serving benchmark: our server vs the raw bound vs peers, side by side, in one run.

    python benchmarks/vision_bench.py                      # everything; ~20 minutes a run
    python benchmarks/vision_bench.py --models mobilenet_v3_small --seconds 10 --no-peers

Installs what it needs itself (the `bench` extra: Ray Serve, LitServe, aiohttp, matplotlib;
perf_analyzer from the tritonclient 2.41 wheel plus two shared libraries it links, from PyPI
and Debian; NVIDIA Triton as nvidia-pytriton in a venv of its own), prepares the models, then
for each model measures, one after the other on this machine:

  raw      decode + preprocess + forward in a tight loop at the best batch size, no server
           (the servers batch up to the model's configured max batch size)
  ours-1   our server with batching off (max batch size 1)
  ours     our server with dynamic batching (the model's own limits), one process
  ours-workers      --workers N processes behind one port (N = --workers, default 2)
  ours-gateway-one  one process behind clients/go/cmd/snaplearn-gateway (--gateway), Triton's
                    shape: a native front end and one Python process holding one model copy
  ours-gateway      the N worker processes behind the gateway
  ray      Ray Serve, gRPC proxy, @serve.batch          (benchmarks/vision_peers.py)
  litserve LitServe, HTTP, LitAPI batching              (benchmarks/vision_peers.py)
  triton   NVIDIA Triton via PyTriton, Open Inference Protocol gRPC, Triton's dynamic batcher
           (benchmarks/vision_peers.py, in its own venv: see ensure_triton)
  perf_analyzer against ours over the Open Inference Protocol (a second, C++ load generator)

Each server gets a closed loop at --concurrency (its capacity), then open loops at the same
absolute rates for everyone: half of our capacity (latency) and three times it (overload).
The load comes from clients/go/cmd/snaplearn-loadgen, built here with `go build` at the start
(--load-generator go, the default), or from benchmarks/vision_load.py (--load-generator
python): the same semantics and JSON, but the Python one spends about twice the CPU of the 2
cores it shares with the server and starts open-loop requests late at a few thousand per second.
Every process runs torch with --torch-threads intra-op threads and flushes denormals on its
model thread (the engine does; every contender uses the same engine). Events are not
published by our server here (the peers publish nothing either).

Writes docs/benchmarks/vision.md (tables + targets), vision.png (plot) and vision.json (raw
numbers); pass --runs 2 to repeat everything and report medians.
"""

from __future__ import annotations

import argparse
import base64
import collections
import contextlib
import dataclasses
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from snaplearn_common.metrics import scrape

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules, run as a script
from latency_split import client_layer, split
from vision_report import cpu_names, write

REPO = Path(__file__).resolve().parents[1]
BENCH_DIR = Path(__file__).resolve().parent
DOCS = REPO / "docs" / "benchmarks"
MODELS_DIR = REPO / "var" / "models"
BENCH_MODELS_DIR = REPO / "var" / "bench-models"
TOOLS_DIR = REPO / "var" / "bench-tools"
RUNS_DIR = REPO / "var" / "bench-runs"  # per-run scratch (the Go generator's photos)
GO_MODULE = REPO / "clients" / "go"
LOAD_GENERATORS = ("go", "python")
DEFAULT_MODEL = "worksheet-topics"
# The gateway's connections to our server: with worker processes behind one port the kernel
# spreads connections, so more reach every worker (the gateway then sends each worker's items on
# one of them, DECISIONS D22).
GATEWAY_BACKEND_CONNECTIONS = 16
# Go's GC target for the gateway: its default since DECISIONS D24, passed explicitly so that
# the report can say what ran (an experiment's own --gc-percent, given after it, wins).
GATEWAY_GC_PERCENT = 400
PEERS = ("ray", "litserve", "triton")
# Where the Python packages live in a checkout (pyproject.toml's packages.find).
PACKAGE_DIRS = ("services", "vision_server", "recommender_worker", "clients/python")
PY = sys.executable


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- setup ------------------------------------------------------------------------------------


def ensure_bench_extra() -> None:
    try:
        import aiohttp  # noqa: F401
        import litserve  # noqa: F401
        import matplotlib  # noqa: F401
        import ray  # noqa: F401
    except ImportError:
        log("installing the bench extra (pip install -e '.[bench]')")
        subprocess.run([PY, "-m", "pip", "install", "-q", "-e", f"{REPO}[bench]"], check=True)


def prepare_models(names: list[str]) -> dict[str, Path]:
    """model name -> repository root. Random weights for the torchvision architectures."""
    roots = {}
    for name in names:
        if name == DEFAULT_MODEL:
            subprocess.run(
                [PY, "-m", "snaplearn_vision.train", "--repository", str(MODELS_DIR), "--if-missing"],
                check=True,
            )
            roots[name] = MODELS_DIR
            continue
        code = f"""
import torch
from snaplearn_common.topics import DEFAULT_TOPICS
from snaplearn_vision.architectures import build_model
from snaplearn_vision.model_repository import BatchingConfig, ModelConfig, ModelRepository
repository = ModelRepository({str(BENCH_MODELS_DIR)!r})
if not repository.has_model({name!r}):
    torch.manual_seed(0)
    config = ModelConfig(architecture={name!r}, labels=tuple(DEFAULT_TOPICS), input_size=(224, 224),
        channels=3, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
        batching=BatchingConfig(max_batch_size=32, max_queue_delay_ms=5.0), training={{"weights": "random"}})
    repository.save({name!r}, "1", config, build_model({name!r}, len(DEFAULT_TOPICS), 3, None))
"""
        subprocess.run([PY, "-c", code], check=True)
        roots[name] = BENCH_MODELS_DIR
    return roots


def ensure_perf_analyzer() -> tuple[Path | None, dict[str, str], str]:
    """(binary, extra environment, note). perf-analyzer on PyPI is a placeholder (0.1.0) for
    this platform; the tritonclient 2.41 manylinux wheel still ships the binary, which links
    libb64 (Debian) and libcudart 12 (PyPI) though it never touches a GPU here."""
    binary = TOOLS_DIR / "tritonclient-2.41.0.data" / "data" / "bin" / "perf_analyzer"
    libs = [TOOLS_DIR / "usr" / "lib" / "x86_64-linux-gnu", TOOLS_DIR / "nvidia" / "cuda_runtime" / "lib"]
    env = {"LD_LIBRARY_PATH": ":".join(str(p) for p in libs)}
    if binary.exists():
        return binary, env, "perf_analyzer from the tritonclient 2.41.0 wheel"
    TOOLS_DIR.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for requirement in ("tritonclient==2.41.0", "nvidia-cuda-runtime-cu12==12.9.79"):
                subprocess.run(
                    [
                        PY,
                        "-m",
                        "pip",
                        "download",
                        "-q",
                        "--no-deps",
                        "--only-binary=:all:",
                        "-d",
                        tmp,
                        requirement,
                    ],
                    check=True,
                )
            subprocess.run(["apt-get", "download", "libb64-0d"], cwd=tmp, check=True, capture_output=True)
            for wheel in Path(tmp).glob("*.whl"):
                subprocess.run(["unzip", "-q", "-o", str(wheel), "-d", str(TOOLS_DIR)], check=True)
            for deb in Path(tmp).glob("*.deb"):
                subprocess.run(["dpkg-deb", "-x", str(deb), str(TOOLS_DIR)], check=True)
        binary.chmod(0o755)
        probe = subprocess.run(
            [str(binary), "--version"], env={**os.environ, **env}, capture_output=True, text=True
        )
        if "error while loading shared libraries" in probe.stderr:
            return None, env, f"perf_analyzer does not start: {probe.stderr.strip()[:200]}"
        return binary, env, "perf_analyzer from the tritonclient 2.41.0 wheel"
    except (subprocess.CalledProcessError, OSError) as error:
        return None, env, f"perf_analyzer unavailable: {error}"


TRITON_VENV = TOOLS_DIR / "triton-venv"
PYTRITON = "nvidia-pytriton==0.7.0"


def ensure_triton() -> tuple[Path | None, dict[str, str], str]:
    """(python, extra environment, note) for running NVIDIA Triton through PyTriton.

    PyTriton pins numpy<2, so it gets a venv of its own (var/bench-tools/triton-venv) that also
    sees this environment's packages (torch, our engine) behind its own, through a .pth file.
    Its Python-backend stub is built per Python minor version and links libpython3.X.so
    dynamically: LD_LIBRARY_PATH puts this interpreter's own libpython first, or the stub may
    load the system's older 3.11 library under this interpreter's newer standard library and
    fail (multiprocessing's RLock lacks `_recursion_count`; the model never loads).
    """
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    env = {"LD_LIBRARY_PATH": ":".join(p for p in (libdir, os.environ.get("LD_LIBRARY_PATH", "")) if p)}
    python = TRITON_VENV / "bin" / "python"
    probe = [str(python), "-c", "import pytriton.triton, torch, snaplearn_vision.engine"]
    try:
        if not python.exists() or subprocess.run(probe, capture_output=True).returncode != 0:
            log(f"installing {PYTRITON} into {TRITON_VENV}")
            base = getattr(sys, "_base_executable", sys.executable)
            subprocess.run([base, "-m", "venv", "--clear", str(TRITON_VENV)], check=True)
            subprocess.run([str(python), "-m", "pip", "install", "-q", PYTRITON], check=True)
            site_dir = subprocess.run(
                [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
            ours = sysconfig.get_paths()["purelib"]
            # Processed after the venv's own site-packages: its numpy<2 wins, torch comes from ours.
            Path(site_dir, "zz_snaplearn.pth").write_text(f"import site; site.addsitedir({ours!r})\n")
        check = subprocess.run(probe, capture_output=True, text=True)
        if check.returncode != 0:
            return None, env, f"NVIDIA Triton (PyTriton) unavailable: {check.stderr.strip()[-300:]}"
    except (subprocess.CalledProcessError, OSError) as error:
        return None, env, f"NVIDIA Triton (PyTriton) unavailable: {error}"
    return python, env, f"NVIDIA Triton from {PYTRITON} (its own venv, {TRITON_VENV.relative_to(REPO)})"


# -- processes --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def base_env(torch_threads: int) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(torch_threads), "PYTHONPATH": str(BENCH_DIR)}


@contextlib.contextmanager
def process(
    argv: list[str], env: dict[str, str], ready: str, timeout_s: float = 180
) -> Iterator[subprocess.Popen[str]]:
    """Start a server; yield once a stdout line contains `ready`; SIGTERM it afterwards."""
    proc = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    last_lines: collections.deque[str] = collections.deque(maxlen=3)  # for the error, if it fails
    try:
        for line in proc.stdout:
            if ready in line:
                break
            last_lines.append(line.strip()[-200:])
            if time.monotonic() > deadline:
                raise TimeoutError(f"{argv[:4]} not ready in {timeout_s}s")
        else:
            raise RuntimeError(
                f"{argv[:4]} exited with {proc.wait()} before it was ready; its last output: "
                + " | ".join(last_lines)
            )
        # Keep reading: a server whose stdout pipe fills blocks on its next log line. Ray Serve
        # logs every request, and a stalled Ray driver slowed its whole app to ~15 img/s.
        threading.Thread(target=collections.deque, args=(proc.stdout, 0), daemon=True).start()
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        time.sleep(1.0)  # let the CPU settle before the next contender


# What load() runs before its shared arguments; load_generator() switches it to the Go binary.
_load_command: list[str] = [PY, str(BENCH_DIR / "vision_load.py")]


def build_go_command(name: str, flag: str, hint: str, module: Path = GO_MODULE) -> Path:
    """`go build` <module>/cmd/<name> into <module>/bin (module: clients/go of this checkout, or
    of another, e.g. an A/B's baseline); SystemExit (naming `flag` and the way around it) if it
    cannot."""
    binary = module / "bin" / name
    go = shutil.which("go")
    if go is None:
        raise SystemExit(f"{flag}: the go toolchain is not on PATH; install Go, {hint}")
    log(f"building {binary.relative_to(module.parent.parent)} in {module.parent.parent}")
    out = subprocess.run(
        [go, "build", "-o", str(binary), f"./cmd/{name}"], cwd=module, capture_output=True, text=True
    )
    if out.returncode != 0:
        raise SystemExit(
            f"{flag}: `go build ./cmd/{name}` in {module} failed "
            f"({out.returncode}): {(out.stdout + out.stderr).strip()[-2000:]}\nFix the build, {hint}"
        )
    return binary


def build_go_loadgen() -> Path:
    hint = "or pass --load-generator python to use benchmarks/vision_load.py instead"
    return build_go_command("snaplearn-loadgen", "--load-generator go", hint)


def cpu_list(text: str) -> frozenset[int]:
    """--generator-cpus: "0" or "0,2" -> {0} or {0, 2}."""
    try:
        cpus = frozenset(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected CPU numbers such as 0 or 0,2, got {text!r}") from None
    if not cpus:
        raise argparse.ArgumentTypeError("expected at least one CPU number")
    return cpus


@contextlib.contextmanager
def load_generator(name: str, nice: int = 0, cpus: frozenset[int] | None = None) -> Iterator[None]:
    """Make load() use generator `name` ("go" or "python") inside the block, at niceness `nice`
    (0: as this process; negative needs root). For "go": build the binary once and write
    vision_load.photos() once, as 000.jpg..., into a scratch directory under var/bench-runs that
    the block's load() calls share (removed afterwards).

    cpus: the generator runs alone on these CPUs (taskset) and this process, with everything
    it starts inside the block (servers, gateway, peers, the raw bound), on the others, as if
    the callers were on machines of their own; None: everyone shares every CPU."""
    global _load_command
    if name not in LOAD_GENERATORS:
        raise ValueError(f"load generator {name!r} is not one of {LOAD_GENERATORS}")
    with contextlib.ExitStack() as stack:
        command = [PY, str(BENCH_DIR / "vision_load.py")]
        if name == "go":
            binary = build_go_loadgen()
            from vision_load import photos

            RUNS_DIR.mkdir(parents=True, exist_ok=True)
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="photos-", dir=RUNS_DIR))
            for index, photo in enumerate(photos()):
                (Path(tmp) / f"{index:03d}.jpg").write_bytes(photo)
            command = [str(binary), "--photos", tmp]
        if nice:
            command = ["nice", "-n", str(nice), *command]
        if cpus is not None:
            allowed = os.sched_getaffinity(0)
            rest = allowed - cpus
            if not cpus <= allowed or not rest:
                raise SystemExit(
                    f"--generator-cpus {sorted(cpus)}: this process may run on CPUs {sorted(allowed)}; "
                    "the generator's CPUs must be among them and leave at least one for the servers"
                )
            command = ["taskset", "-c", ",".join(map(str, sorted(cpus))), *command]
            os.sched_setaffinity(0, rest)
            stack.callback(os.sched_setaffinity, 0, allowed)
        previous, _load_command = _load_command, command
        try:
            yield
        finally:
            _load_command = previous


# The load generator's warm-up before each measured window (connections, first batches).
WARMUP_S = 3.0


def load(
    target: str,
    protocol: str,
    mode: str,
    seconds: float,
    *,
    concurrency: int = 0,
    rate: float = 0.0,
    timeout_s: float = 5.0,
    warmup_s: float = WARMUP_S,
    connections: int = 64,
    model: str = "",
) -> dict[str, Any]:
    argv = [
        *_load_command,
        "--target",
        target,
        "--protocol",
        protocol,
        "--seconds",
        str(seconds),
        "--warmup",
        str(warmup_s),
        "--timeout",
        str(timeout_s),
        "--connections",
        str(connections),
        *(["--model", model] if protocol == "oip" else []),
        mode,
    ]
    argv += ["--concurrency", str(concurrency)] if mode == "closed" else ["--rate", f"{rate:.2f}"]
    out = subprocess.run(
        argv, env={**os.environ, "PYTHONPATH": str(BENCH_DIR)}, capture_output=True, text=True
    )
    if out.returncode != 0:
        raise RuntimeError(f"load generator failed: {out.stderr[-2000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def batch_stats(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """Batch-size distribution and mean batch compute time between two scrapes."""

    def delta(prefix: str) -> dict[str, float]:
        return {k: after[k] - before.get(k, 0.0) for k in after if k.startswith(prefix)}

    sizes = delta("snaplearn_vision_batch_size_bucket")
    count = sum(delta("snaplearn_vision_batch_size_count").values())
    total = sum(delta("snaplearn_vision_batch_size_sum").values())
    compute_s = sum(delta("snaplearn_vision_batch_compute_seconds_sum").values())
    buckets: dict[str, float] = {}
    previous = 0.0
    for key in sorted(sizes, key=lambda k: float(k.split('le="')[1].split('"')[0].replace("+Inf", "inf"))):
        bound = key.split('le="')[1].split('"')[0]
        cumulative = sizes[key]
        if cumulative - previous > 0:
            buckets[f"<={bound}"] = round((cumulative - previous) / max(count, 1), 3)
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


# -- contenders -------------------------------------------------------------------------------


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
    """The models, load and server settings every vision benchmark command takes."""
    parser.add_argument("--models", default=f"mobilenet_v3_small,{DEFAULT_MODEL}")
    parser.add_argument("--seconds", type=float, default=seconds, help="measurement window per load phase")
    parser.add_argument("--concurrency", type=int, default=64)
    # One intra-op thread: with two, every OpenMP barrier waits for a thread descheduled by the
    # other work on a shared 2-core machine, and small batches slow down tenfold.
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
        type=cpu_list,
        default=None,
        help="run the load generator alone on these CPUs (e.g. 0) and the servers, gateway, peers "
        "and raw bound on the others, as if the callers were elsewhere (default: all share all)",
    )
    parser.add_argument(
        "--load-generator",
        choices=LOAD_GENERATORS,
        default="go",
        help="go: clients/go/cmd/snaplearn-loadgen, built with `go build` at the start (needs Go); "
        "python: benchmarks/vision_load.py, the same semantics at about twice the CPU "
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


def build_gateway(flag: str, way_around: str, checkout: Path = REPO) -> Path:
    """snaplearn-gateway built from the checkout at `checkout` (this one by default)."""
    return build_go_command("snaplearn-gateway", flag, way_around, checkout / "clients" / "go")


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
        PY,
        "-m",
        "snaplearn_vision.main",
        "--no-publish",  # the peers publish nothing either
        "--port",
        str(port),
        "--metrics-port",
        str(metrics_port),
        "--model-repository",
        str(root),
        "--model-name",
        model,
        "--model-version",
        "1",
        "--device",
        "cpu",
        "--torch-threads",
        str(settings.torch_threads),
        "--decode-threads",
        str(settings.decode_threads),
        "--max-queue-size",
        str(settings.max_queue_size),
        "--ready-file",
        str(ready),
        "--log-level",
        "WARNING",
    ]
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
    env = base_env(settings.torch_threads)
    if code is not None:  # its packages first: they shadow this checkout's editable install
        env["PYTHONPATH"] = os.pathsep.join([*(str(code / d) for d in PACKAGE_DIRS), str(BENCH_DIR)])
    with tempfile.TemporaryDirectory() as tmp:
        argv = ours_argv(root, model, port, metrics_port, Path(tmp) / "ready.json", settings, max_batch_size)
        with process([*argv, *extra], env, "vision server ready") as proc:
            yield OurServer(f"127.0.0.1:{port}", metrics_port, proc.pid)


@dataclasses.dataclass(frozen=True)
class OurGateway:
    target: str
    pid: int
    metrics_port: int


@contextlib.contextmanager
def our_gateway(settings: Settings, backend: str, extra: Sequence[str] = ()) -> Iterator[OurGateway]:
    """clients/go/cmd/snaplearn-gateway in front of `backend`, with `extra` flags, until the
    block ends."""
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


def _proc_table() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU seconds so far), for every process, from Linux's /proc."""
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    table: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile
        table[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / ticks)
    return table


def descendant_pids(pid: int, table: dict[int, tuple[int, float]] | None = None) -> list[int]:
    """The live descendants of `pid` (worker processes, decode processes), parents first."""
    table = _proc_table() if table is None else table
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        children = sorted(child for child, (ppid, _) in table.items() if ppid == parent)
        found += children
        frontier += children
    return found


def process_tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) spent so far by process `pid` and its live descendants
    (worker processes); from Linux's /proc, nan where there is none."""
    table = _proc_table()
    if pid not in table:
        return float("nan")
    return sum(table[member][1] for member in [pid, *descendant_pids(pid, table)])


@contextlib.contextmanager
def cpu_per_image(pids: dict[str, int], into: dict[str, Any]) -> Iterator[None]:
    """Around one load() call: the CPU microseconds each process tree spent per image served,
    into `into["cpu_us_per_image"]`, with the generator's own (its generator_cpu_cores), and
    the cores each used on average, into `into["cpu_cores"]` (what the machine's cores went to:
    under overload the generator's and the gateway's share is taken from the server's).
    The load's warm-up counts in the CPU and its window in the images, at about the same rate."""
    before = {name: process_tree_cpu_s(pid) for name, pid in pids.items()}
    started = time.monotonic()
    yield
    wall = time.monotonic() - started
    rate = into.get("throughput") or float("nan")
    cores = {name: (process_tree_cpu_s(pid) - before[name]) / wall for name, pid in pids.items()}
    cores["generator"] = into.get("generator_cpu_cores", float("nan"))
    into["cpu_us_per_image"] = {name: round(used / rate * 1e6, 1) for name, used in cores.items()}
    into["cpu_cores"] = {name: round(used, 3) for name, used in cores.items()}


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
) -> dict[str, Any]:
    """Our server (behind the gateway if `gateway`; from the checkout at `code` if given):
    capacity (closed loop), then open loops at `rates` (half, overload), or at half and 3x of
    the capacity just measured when rates is None."""
    conns = settings.connections
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(our_server(root, model, settings, max_batch_size, extra, code))
        target, metrics_port = server.target, server.metrics_port
        pids = {"server": server.pid}
        ports = {"server": metrics_port}
        if gateway:
            front = stack.enter_context(our_gateway(settings, server.target, gateway_extra))
            target, pids["gateway"], ports["gateway"] = front.target, front.pid, front.metrics_port
        result: dict[str, Any] = {"closed": {}}
        before = scrape(metrics_port)
        with cpu_per_image(pids, result["closed"]):
            closed_loop = {"concurrency": settings.concurrency, "connections": conns}
            result["closed"].update(load(target, "grpc", "closed", settings.seconds, **closed_loop))
        result["closed"]["server"] = batch_stats(before, scrape(metrics_port))
        capacity = result["closed"]["throughput"]
        half, overload = rates if rates is not None else (capacity / 2, capacity * 3)
        result["rates"] = {"half": half, "overload": overload}
        # Scraped as the generator's measured window opens (after its warm-up), so that the
        # processes' histograms cover the requests the generator's own percentiles do.
        befores: dict[str, dict[str, float]] = {}
        window_opens = threading.Timer(
            WARMUP_S, lambda: befores.update({process: scrape(port) for process, port in ports.items()})
        )
        window_opens.start()
        result["half"] = load(target, "grpc", "open", settings.seconds, rate=half, connections=conns)
        window_opens.join()
        afters = {process: scrape(port) for process, port in ports.items()}
        result["half"]["server"] = batch_stats(befores["server"], afters["server"])
        # Where the half-load latency goes, layer by layer (the p99 target is judged there).
        windows = {process: (befores[process], afters[process]) for process in ports}
        result["half"]["split"] = {"client": client_layer(result["half"]), **split(windows)}
        before = scrape(metrics_port)
        result["overload"] = {}
        with cpu_per_image(pids, result["overload"]):  # where the cores go under overload
            result["overload"].update(
                load(target, "grpc", "open", settings.seconds, rate=overload, connections=conns)
            )
        result["overload"]["server"] = batch_stats(before, scrape(metrics_port))
        if settings.perf_analyzer is not None and max_batch_size != 1:
            result["perf_analyzer"] = run_perf_analyzer(settings, model, target)
    return result


def bench_peer(
    peer: str, root: Path, model: str, settings: Settings, max_batch_size: int, rates: tuple[float, float]
) -> dict[str, Any]:
    port = free_port()
    python = settings.triton_python if peer == "triton" else PY
    argv = [
        str(python),
        str(BENCH_DIR / "vision_peers.py"),
        peer,
        "--repository",
        str(root),
        "--model",
        model,
        "--port",
        str(port),
        "--torch-threads",
        str(settings.torch_threads),
        "--max-batch-size",
        str(max_batch_size),
        "--wait-s",
        str(settings.max_queue_delay_ms / 1000),
    ]
    env = base_env(settings.torch_threads)
    metrics_port = 0  # Triton's, scraped for its batch sizes
    if peer == "ray":
        target, protocol = f"127.0.0.1:{port}", "grpc"
        # A port of its own: port + 1 may be a client's ephemeral port (the generator's last run).
        argv += ["--http-port", str(free_port())]
    elif peer == "triton":
        target, protocol = f"127.0.0.1:{port}", "oip"
        env.update(settings.triton_env)
        metrics_port = free_port()
        argv += ["--http-port", str(free_port()), "--metrics-port", str(metrics_port)]
    else:
        target, protocol = f"http://127.0.0.1:{port}/predict", "http"
    with process(argv, env, "ready", timeout_s=300):
        result: dict[str, Any] = {}
        common = {"connections": settings.connections, "model": model}
        before = scrape(metrics_port) if peer == "triton" else {}
        result["closed"] = load(
            target, protocol, "closed", settings.seconds, concurrency=settings.concurrency, **common
        )
        if peer == "triton":  # the protocol's answers do not say; Triton's metrics do
            result["closed"]["mean_batch_size_seen"] = triton_mean_batch(before, scrape(metrics_port))
        result["half"] = load(target, protocol, "open", settings.seconds, rate=rates[0], **common)
        result["overload"] = load(target, protocol, "open", settings.seconds, rate=rates[1], **common)
    return result


def triton_mean_batch(before: dict[str, float], after: dict[str, float]) -> float:
    """Requests per model execution between two scrapes of Triton's metrics (its mean batch)."""

    def delta(name: str) -> float:
        return sum(v - before.get(k, 0.0) for k, v in after.items() if k.startswith(name + "{"))

    executions = delta("nv_inference_exec_count")
    return delta("nv_inference_count") / executions if executions else float("nan")


def run_perf_analyzer(settings: Settings, model: str, target: str) -> dict[str, Any]:
    from vision_load import photos

    assert settings.perf_analyzer is not None
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "images.json"
        # b64 is the tensor's raw content; for BYTES that is each element's 4-byte length + bytes.
        entries = [
            {"IMAGE": {"b64": base64.b64encode(struct.pack("<I", len(photo)) + photo).decode(), "shape": [1]}}
            for photo in photos(16)
        ]
        data.write_text(json.dumps({"data": entries}))
        csv = Path(tmp) / "out.csv"
        argv = [
            str(settings.perf_analyzer),
            "-m",
            model,
            "-u",
            target,
            "-i",
            "grpc",
            "--input-data",
            str(data),
            "--concurrency-range",
            str(settings.concurrency),
            "--measurement-interval",
            str(int(settings.seconds * 1000)),
            "--stability-percentage",
            "30",  # this machine is shared: the default 10% rarely settles
            "--max-trials",
            "4",
            "-f",
            str(csv),
        ]
        out = subprocess.run(
            argv, env={**os.environ, **settings.perf_env}, capture_output=True, text=True, timeout=600
        )
        if out.returncode != 0 or not csv.exists():
            return {"error": (out.stdout + out.stderr).strip()[-800:]}
        header, row = csv.read_text().splitlines()[:2]
        values = dict(zip(header.split(","), row.split(","), strict=False))
        return {
            "throughput": float(values["Inferences/Second"]),
            "p50_ms": float(values["p50 latency"]) / 1000,
            "p99_ms": float(values["p99 latency"]) / 1000,
        }


def raw_bound(root: Path, model: str, settings: Settings) -> dict[str, Any]:
    argv = [
        PY,
        str(BENCH_DIR / "vision_raw.py"),
        "--repository",
        str(root),
        "--model",
        model,
        "--seconds",
        str(max(3.0, settings.seconds / 3)),
        "--torch-threads",
        str(settings.torch_threads),
        "--decode-threads",
        str(settings.decode_threads),
    ]
    out = subprocess.run(
        argv, env=base_env(settings.torch_threads), capture_output=True, text=True, check=True
    )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def configured_max_batch_size(root: Path, model: str) -> int:
    """The max batch size in the model's config.json (version 1), what a deployment uses."""
    from snaplearn_vision.model_repository import ModelRepository

    return int(ModelRepository(root).load_config(model, "1").batching.max_batch_size)


def bench_model(root: Path, model: str, settings: Settings) -> dict[str, Any]:
    results: dict[str, Any] = {}
    log(f"{model}: raw bound")
    results["raw"] = raw_bound(root, model, settings)
    # Everyone batches up to the model's own configured limit, as it would be deployed.
    max_batch_size = settings.max_batch_size or configured_max_batch_size(root, model)
    results["max_batch_size"] = max_batch_size
    results["max_queue_delay_ms"] = settings.max_queue_delay_ms
    log(f"{model}: ours, dynamic batching (max batch {max_batch_size})")
    results["ours"] = bench_ours(root, model, settings, max_batch_size, None)
    rates = (results["ours"]["rates"]["half"], results["ours"]["rates"]["overload"])
    if settings.workers > 1:
        # Its own capacity sets its own half and 3x loads: the targets are about each configuration.
        log(f"{model}: ours, {settings.workers} worker processes (max batch {max_batch_size})")
        per_worker = dataclasses.replace(settings, decode_threads=settings.worker_decode_threads)
        workers = ["--workers", str(settings.workers)]
        results["ours-workers"] = bench_ours(root, model, per_worker, max_batch_size, None, workers)
        results["workers"] = settings.workers
    if settings.gateway is not None:
        # Triton's shape: a native front end and one Python process with one model copy.
        log(f"{model}: ours, one process behind the gateway")
        results["ours-gateway-one"] = bench_ours(root, model, settings, max_batch_size, None, gateway=True)
        if settings.workers > 1:
            log(f"{model}: ours, {settings.workers} worker processes behind the gateway")
            per_worker = dataclasses.replace(settings, decode_threads=settings.worker_decode_threads)
            workers = ["--workers", str(settings.workers)]
            results["ours-gateway"] = bench_ours(
                root, model, per_worker, max_batch_size, None, workers, gateway=True
            )
    log(f"{model}: ours, batching off")
    results["ours-1"] = bench_ours(root, model, settings, 1, rates)
    if settings.peers:
        for peer in PEERS:
            if peer == "triton" and settings.triton_python is None:
                continue  # not installed here (the run's notes say why)
            log(f"{model}: {peer}")
            try:
                results[peer] = bench_peer(peer, root, model, settings, max_batch_size, rates)
            except Exception as error:  # a peer that fails to start is reported, not fatal
                results[peer] = {"error": f"{type(error).__name__}: {error}"}
    return results


Median = Callable[[str], float]  # a field's median over one row's samples


def generator_note(cpus: frozenset[int] | None) -> str:
    """What the experiment scripts print about --generator-cpus ("" without it)."""
    return f", load generator alone on CPU(s) {cpu_names(cpus)}" if cpus else ""


def alternating(items: Sequence[str], repetition: int) -> list[str]:
    """The experiment scripts' order of measurement: `items` as given in even repetitions,
    reversed in odd ones (a, b, then b, a, ...), so that drift in the machine's load over a
    run hits every item alike."""
    return list(items) if repetition % 2 == 0 else list(reversed(items))


@dataclasses.dataclass(frozen=True)
class ExperimentSetups:
    """The experiment scripts' server configurations: one process (`settings`) and --workers N
    worker processes (`per_worker`: --worker-decode-threads each)."""

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
        servers = {"1 process": (self.settings, [])}
        if self.settings.workers > 1:
            servers[self.workers_name] = self.workers
        return servers


def experiment_setups(
    args: argparse.Namespace, gateway_hint: str | None, gateway_max_in_flight: int = 128
) -> ExperimentSetups:
    """Settings from add_server_arguments()'s `args` (no peers, no perf_analyzer) for the
    experiment scripts. `gateway_hint`: None, no gateway; else the gateway is built (`go build`)
    and a failed build's SystemExit ends with the hint (the way around it)."""
    settings = settings_from_args(
        args,
        peers=False,
        perf_analyzer=None,
        perf_env={},
        gateway=None if gateway_hint is None else build_gateway("--gateway", gateway_hint),
        gateway_max_in_flight=gateway_max_in_flight,
    )
    per_worker = dataclasses.replace(settings, decode_threads=settings.worker_decode_threads)
    return ExperimentSetups(settings, per_worker)


def print_median_table(
    rows: dict[tuple[str, ...], list[dict[str, Any]]],
    keys: Sequence[str],
    columns: Sequence[tuple[str, Callable[[Median], str]]],
) -> None:
    """Print a markdown table for the experiment scripts: a row per key tuple (headers `keys`),
    then one cell per column, made from the medians of that row's samples."""
    print("| " + " | ".join([*keys, *(header for header, _ in columns)]) + " |")
    print("|" + "---|" * len(keys) + "---:|" * len(columns))
    for key, samples in rows.items():

        def median(field: str, samples: list[dict[str, Any]] = samples) -> float:
            return statistics.median(sample[field] for sample in samples)

        print("| " + " | ".join([*key, *(cell(median) for _, cell in columns)]) + " |")


# -- main -------------------------------------------------------------------------------------


def bench_runs(args: argparse.Namespace) -> tuple[list[dict[str, Any]], str]:
    """Set up (bench extra, models, perf_analyzer, Triton) and measure every run: (runs, notes)."""
    ensure_bench_extra()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    roots = prepare_models(models)
    perf, perf_env, perf_note = (
        (None, {}, "perf_analyzer not run") if args.no_perf_analyzer else ensure_perf_analyzer()
    )
    log(perf_note)
    triton, triton_env, triton_note = (
        (None, {}, "NVIDIA Triton not run") if args.no_peers or not args.triton else ensure_triton()
    )
    log(triton_note)
    settings = settings_from_args(
        args,
        peers=not args.no_peers,
        perf_analyzer=perf,
        perf_env=perf_env,
        gateway=build_gateway("--gateway", "or pass --no-gateway") if args.gateway else None,
        gateway_max_in_flight=args.gateway_max_in_flight,
    )
    settings = dataclasses.replace(settings, triton_python=triton, triton_env=triton_env)
    runs = []
    for run in range(args.runs):
        log(f"run {run + 1} of {args.runs}")
        runs.append({model: bench_model(roots[model], model, settings) for model in models})
    return runs, f"{perf_note}; {triton_note}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_server_arguments(parser, seconds=15.0, max_batch_size=None)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument(
        "--gateway",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure one process and the --workers worker processes behind "
        "clients/go/cmd/snaplearn-gateway (built with `go build`; needs Go)",
    )
    parser.add_argument("--gateway-max-in-flight", type=int, default=128, help="the gateway's limit")
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument(
        "--triton",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=f"among the peers, NVIDIA Triton ({PYTRITON}, installed into {TRITON_VENV.name})",
    )
    parser.add_argument("--no-perf-analyzer", action="store_true")
    parser.add_argument("--out", type=Path, default=DOCS)
    args = parser.parse_args(argv)
    # First: a failed Go build stops before the setup.
    with load_generator(args.load_generator, cpus=args.generator_cpus):
        runs, perf_note = bench_runs(args)
    meta = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "torch_threads": args.torch_threads,
        "decode_threads": args.decode_threads,
        "max_queue_size": args.max_queue_size,
        "max_queue_delay_ms": args.max_queue_delay_ms,
        "concurrency": args.concurrency,
        "connections": args.connections,
        "workers": args.workers,
        "worker_decode_threads": args.worker_decode_threads,
        "gateway_max_in_flight": args.gateway_max_in_flight if args.gateway else None,
        "gateway_gc_percent": GATEWAY_GC_PERCENT if args.gateway else None,
        "seconds": args.seconds,
        "load_generator": args.load_generator,
        "generator_cpus": sorted(args.generator_cpus) if args.generator_cpus else None,
        "notes": perf_note,
        "command": ("python benchmarks/vision_bench.py " + " ".join(argv)).strip(),
    }
    write(runs, meta, args.out)
    log(f"wrote {args.out / 'vision.md'}")
    print((args.out / "vision.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
