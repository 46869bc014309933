"""The vision comparison: our server vs the raw bound vs peers, side by side, in one run.

    python benchmarks/vision_bench.py                      # everything
    python benchmarks/vision_bench.py --models mobilenet_v3_small --seconds 10 --no-peers
    python benchmarks/vision_bench.py --quick              # a smoke run: each part once, briefly

Installs what it needs itself (the `peers` extra of snaplearn-bench: Ray Serve, LitServe,
aiohttp, matplotlib; perf_analyzer from the tritonclient 2.41 wheel plus two shared libraries it
links, from PyPI and Debian; NVIDIA Triton as nvidia-pytriton in a venv of its own), prepares
the models, then for each model measures, one after the other on this machine:

  raw      decode + preprocess + forward in a tight loop at the best batch size, no server
           (the servers batch up to the model's configured max batch size)
  ours-1   our server with batching off (max batch size 1)
  ours     our server with dynamic batching (the model's own limits), one process
  ours-workers      --workers N processes behind one port (N = --workers, default 2)
  ours-gateway-one  one process behind snaplearn-gateway (--gateway), Triton's shape: a
                    native front end and one Python process holding one model copy
  ours-gateway      the N worker processes behind the gateway
  ray      Ray Serve, gRPC proxy, @serve.batch          (snaplearn_bench.peer_servers)
  litserve LitServe, HTTP, LitAPI batching              (snaplearn_bench.peer_servers)
  triton   NVIDIA Triton via PyTriton, Open Inference Protocol gRPC, Triton's dynamic batcher
           (snaplearn_bench.peer_servers, in its own venv: see snaplearn_bench.peers)
  perf_analyzer against ours over the Open Inference Protocol (a second, C++ load generator)

Each server gets a closed loop at --concurrency (its capacity), then open loops at the same
absolute rates for everyone: half of our capacity (latency) and three times it (overload).
The load comes from benchmarks/loadgen, built here with `go build` at the start
(--load-generator go, the default), or from snaplearn_bench.pyloadgen (--load-generator
python): the same semantics and JSON, but the Python one spends more of the cores it shares
with the server and starts open-loop requests late at a few thousand per second (DECISIONS
D16). Every process runs torch with --torch-threads intra-op threads and flushes denormals on
its model thread (the engine does; every contender uses the same engine). Events are not
published by our server here (the peers publish nothing either).

Writes docs/benchmarks/vision.md (tables + targets), vision.png (plot) and vision.json (raw
numbers); pass --runs 2 to repeat everything and report medians.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from snaplearn_bench.load import load_generator
from snaplearn_bench.models import DEFAULT_MODEL, configured_max_batch_size, parse_models, prepare_models
from snaplearn_bench.ours import (
    GATEWAY_GC_PERCENT,
    Settings,
    add_server_arguments,
    bench_ours,
    settings_from_args,
)
from snaplearn_bench.paths import BENCH_DIR, DOCS, MODELS_DIR, PY, RUNS_DIR, log
from snaplearn_bench.peers import (
    PEERS,
    PYTRITON,
    TRITON_VENV,
    bench_peer,
    ensure_perf_analyzer,
    ensure_triton,
    run_perf_analyzer,
)
from snaplearn_bench.processes import gateway_binary, torch_env
from snaplearn_bench.vision_report import write

# --quick: every part of a run once, in seconds rather than minutes (a smoke test of the
# harness, not a measurement).
QUICK = {
    "models": "worksheet-topics",
    "seconds": 1.0,
    "runs": 1,
    "no_peers": True,
    "no_perf_analyzer": True,
    "gateway": False,
    "workers": 1,
}


def ensure_peers_extra() -> None:
    """The peers' packages (snaplearn-bench's `peers` extra), installed on first use."""
    try:
        import aiohttp  # noqa: F401
        import litserve  # noqa: F401
        import matplotlib  # noqa: F401
        import ray  # noqa: F401
    except ImportError:
        log("installing the peers extra (pip install -e 'benchmarks[peers]')")
        subprocess.run([PY, "-m", "pip", "install", "-q", "-e", f"{BENCH_DIR}[peers]"], check=True)


def raw_bound(root: Path, model: str, settings: Settings, seconds: float) -> dict[str, Any]:
    argv = [
        PY, "-m", "snaplearn_bench.raw",
        "--repository", str(root),
        "--model", model,
        "--seconds", str(seconds),
        "--torch-threads", str(settings.torch_threads),
        "--decode-threads", str(settings.decode_threads),
    ]  # fmt: skip
    out = subprocess.run(argv, env=torch_env(settings.torch_threads), capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"the raw bound failed: {out.stderr[-2000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def bench_model(root: Path, model: str, settings: Settings, raw_seconds: float) -> dict[str, Any]:
    results: dict[str, Any] = {}
    log(f"{model}: raw bound")
    results["raw"] = raw_bound(root, model, settings, raw_seconds)
    # Everyone batches up to the model's own configured limit, as it would be deployed.
    max_batch_size = settings.max_batch_size or configured_max_batch_size(root, model)
    results["max_batch_size"] = max_batch_size
    results["max_queue_delay_ms"] = settings.max_queue_delay_ms
    perf = functools.partial(run_perf_analyzer, settings, model) if settings.perf_analyzer else None
    log(f"{model}: ours, dynamic batching (max batch {max_batch_size})")
    results["ours"] = bench_ours(root, model, settings, max_batch_size, None, perf_analyzer=perf)
    rates = (results["ours"]["rates"]["half"], results["ours"]["rates"]["overload"])
    # Its own capacity sets its own half and 3x loads: the targets are about each configuration.
    per_worker = dataclasses.replace(settings, decode_threads=settings.worker_decode_threads)
    workers = ["--workers", str(settings.workers)]
    if settings.workers > 1:
        log(f"{model}: ours, {settings.workers} worker processes (max batch {max_batch_size})")
        results["ours-workers"] = bench_ours(root, model, per_worker, max_batch_size, None, workers)
        results["workers"] = settings.workers
    if settings.gateway is not None:
        # Triton's shape: a native front end and one Python process with one model copy.
        log(f"{model}: ours, one process behind the gateway")
        results["ours-gateway-one"] = bench_ours(root, model, settings, max_batch_size, None, gateway=True)
        if settings.workers > 1:
            log(f"{model}: ours, {settings.workers} worker processes behind the gateway")
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


def bench_runs(args: argparse.Namespace) -> tuple[list[dict[str, Any]], str]:
    """Set up (the peers' packages, models, perf_analyzer, Triton) and measure every run:
    (runs, notes)."""
    if not args.no_peers:
        ensure_peers_extra()
    models = parse_models(args.models)
    roots = prepare_models(models, args.model_repository)
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
        gateway=gateway_binary("--gateway", "or pass --no-gateway") if args.gateway else None,
        gateway_max_in_flight=args.gateway_max_in_flight,
    )
    settings = dataclasses.replace(settings, triton_python=triton, triton_env=triton_env)
    raw_seconds = args.seconds if args.quick else max(3.0, args.seconds / 3)
    runs = []
    for run in range(args.runs):
        log(f"run {run + 1} of {args.runs}")
        runs.append({model: bench_model(roots[model], model, settings, raw_seconds) for model in models})
    return runs, f"{perf_note}; {triton_note}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="benchmarks/vision_bench.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_server_arguments(parser, seconds=15.0, max_batch_size=None)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument(
        "--gateway",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure one process and the --workers worker processes behind snaplearn-gateway "
        "(services/gateway, built with `go build`; needs Go)",
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
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: the default model only, 1 s windows, one process, no gateway, no peers, "
        "no perf_analyzer (the page it writes is not a measurement)",
    )
    parser.add_argument(
        "--model-repository",
        type=Path,
        default=MODELS_DIR,
        help=f"where the default model ({DEFAULT_MODEL}) is, trained there if missing (default: %(default)s)",
    )
    parser.add_argument("--out", type=Path, default=DOCS)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.quick:
        for name, value in QUICK.items():
            setattr(args, name, value)
        if args.out == DOCS:  # a smoke run's page is no result: keep it out of the docs
            args.out = RUNS_DIR / "quick"
    # First: a failed Go build stops before the setup.
    with load_generator(args.load_generator, cpus=args.generator_cpus):
        runs, notes = bench_runs(args)
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
        "notes": notes,
        "command": ("python benchmarks/vision_bench.py " + " ".join(argv)).strip(),
    }
    write(runs, meta, args.out)
    log(f"wrote {args.out / 'vision.md'}")
    print((args.out / "vision.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
