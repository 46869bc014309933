"""Focused experiment: does a grpc-level limit make refusals faster at 3x overload?

    python benchmarks/vision_fast_refusal.py                   # both models, 2 repetitions, ~4 min
    python benchmarks/vision_fast_refusal.py --cap 300         # a cap below what admission lets in
    python benchmarks/vision_fast_refusal.py --pending 512     # bound grpc's pending-call backlog
    python benchmarks/vision_fast_refusal.py --behind-gateway 128  # snaplearn-gateway in front
    python benchmarks/vision_fast_refusal.py --behind-gateway 128 --generator-nice -10  # generator first
    python benchmarks/vision_fast_refusal.py --models mobilenet_v3_small --reps 1

Only our server, with the limit off and on, side by side in one run. The limit is grpc's cap
on calls in flight, `--max-concurrent-rpcs <--cap>` (default `auto`, VisionSettings.rpc_cap:
queue size + 2 batches + 32), or with --pending N the bound on grpc's backlog of calls Python
has not picked up yet, `--max-pending-calls N` (calls shed there answer CANCELLED), or with
--behind-gateway N the same server behind clients/go/cmd/snaplearn-gateway, which refuses
inference calls beyond N in flight before Python sees them (DECISIONS D19). Per model:
capacity from one closed loop (cap off, as vision_bench.py measures it), then open loops at 3x
that rate, the two configurations interleaved off/on/on/off so that drift in the machine's
load hits both alike. Prints one JSON line per measurement and a median table (refusal p99,
goodput as a share of capacity, the generator's send lag p99, and how many calls grpc's cap
refused, told apart from ours by grpc's message). The load generator is vision_bench.py's
(--load-generator go, the default, or python).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules, run as a script
from vision_bench import (
    Settings,
    add_server_arguments,
    batch_stats,
    build_gateway,
    generator_note,
    load,
    load_generator,
    log,
    our_gateway,
    our_server,
    prepare_models,
    scrape,
    settings_from_args,
)
from vision_load import GRPC_CAP_STATUS


def measure(
    root: Path,
    model: str,
    settings: Settings,
    limit: list[str],
    *,
    closed: bool = False,
    rate: float = 0.0,
    gateway: bool = False,
) -> dict[str, Any]:
    """One server process, one load phase; `limit`: extra server flags ([] = no limit);
    `gateway`: behind snaplearn-gateway."""
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(our_server(root, model, settings, settings.max_batch_size, limit))
        target = server.target
        if gateway:
            target = stack.enter_context(our_gateway(settings, server.target)).target
        before = scrape(server.metrics_port)
        if closed:
            result = load(target, "grpc", "closed", settings.seconds, concurrency=settings.concurrency)
        else:
            result = load(target, "grpc", "open", settings.seconds, rate=rate)
        result["server"] = batch_stats(before, scrape(server.metrics_port))
    return result


def limit_flags(args: argparse.Namespace) -> list[str]:
    if args.behind_gateway is not None:
        return []
    if args.pending is not None:
        return ["--max-pending-calls", str(args.pending)]
    return ["--max-concurrent-rpcs", args.cap]


def limit_name(args: argparse.Namespace) -> str:
    if args.behind_gateway is not None:
        return f"gateway {args.behind_gateway}"
    return f"pending {args.pending}" if args.pending is not None else f"cap {args.cap}"


def experiment(args: argparse.Namespace, settings: Settings) -> list[dict[str, Any]]:
    """Every model's capacity, then the interleaved 3x runs; one median row per (model, cap)."""
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    roots = prepare_models(models)
    table = []
    for model in models:
        log(f"{model}: capacity (closed loop, cap off)")
        capacity = measure(roots[model], model, settings, [], closed=True)["throughput"]
        rate = 3 * capacity
        order = [False, True, True, False] * ((args.reps + 1) // 2)
        rows: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
        for cap in order:
            if len(rows[cap]) == args.reps:
                continue
            log(f"{model}: 3x = {rate:.0f}/s, cap {'on' if cap else 'off'}")
            result = measure(
                roots[model],
                model,
                settings,
                limit_flags(args) if cap else [],
                rate=rate,
                gateway=cap and args.behind_gateway is not None,
            )
            rows[cap].append(result)
            print(
                json.dumps(
                    {
                        "model": model,
                        "cap": cap,
                        "capacity": capacity,
                        "rate": rate,
                        "load_generator": args.load_generator,
                        **result,
                    }
                )
            )
        for cap in (False, True):
            runs = rows[cap]

            def med(key: str, runs: list[dict[str, Any]] = runs) -> float:
                return statistics.median(float(r[key]) for r in runs)

            table.append(
                {
                    "model": model,
                    "cap": limit_name(args) if cap else "off",
                    "capacity": capacity,
                    "refusal_p99_ms": med("rejected_p99_ms"),
                    "goodput_pct": 100 * med("throughput") / capacity,
                    "ok_p99_ms": med("p99_ms"),
                    "send_lag_p99_ms": med("send_lag_p99_ms"),
                    "grpc_cap_refusals": [r["errors"].get(GRPC_CAP_STATUS, 0) for r in runs],
                    # Shed from grpc's pending-call backlog (no Python involved), per repetition.
                    "cancelled": [r["errors"].get("CANCELLED", 0) for r in runs],
                    "errors": [r["errors"] for r in runs],
                    "load_generator": args.load_generator,
                }
            )
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_server_arguments(parser, seconds=8.0, max_batch_size=32)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--cap", default="auto", help="--max-concurrent-rpcs when the cap is on")
    parser.add_argument(
        "--pending", type=int, help="compare --max-pending-calls N instead of the cap on calls in flight"
    )
    parser.add_argument(
        "--behind-gateway",
        type=int,
        metavar="N",
        help="compare the server behind snaplearn-gateway --max-in-flight N instead (needs Go)",
    )
    parser.add_argument(
        "--generator-nice",
        type=int,
        default=0,
        metavar="N",
        help="run the load generator at niceness N (negative needs root): it stands in for phones on "
        "other machines, so given priority it no longer waits behind the server for the CPU",
    )
    args = parser.parse_args(argv)
    behind = args.behind_gateway
    settings = settings_from_args(
        args,
        peers=False,
        perf_analyzer=None,
        perf_env={},
        gateway=build_gateway("--behind-gateway", "or leave out --behind-gateway")
        if behind is not None
        else None,
        gateway_max_in_flight=behind if behind is not None else 128,
    )
    # First: a failed Go build stops early.
    with load_generator(args.load_generator, args.generator_nice, args.generator_cpus):
        table = experiment(args, settings)
    print(
        f"load generator: {args.load_generator}, niceness {args.generator_nice}"
        f"{generator_note(args.generator_cpus)}"
    )
    print(
        "| model | grpc limit | capacity img/s | refusal p99 ms | goodput % of capacity | OK p99 ms "
        "| send lag p99 ms | refused by grpc's cap | shed by grpc (CANCELLED) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in table:
        print(
            f"| {row['model']} | {row['cap']} | {row['capacity']:.0f} | {row['refusal_p99_ms']:.1f} | "
            f"{row['goodput_pct']:.0f} | {row['ok_p99_ms']:.0f} | {row['send_lag_p99_ms']:.1f} | "
            f"{row['grpc_cap_refusals']} | {row['cancelled']} |"
        )
    for row in table:
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
