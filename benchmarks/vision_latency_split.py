"""Where the half-load latency goes: client, gateway, server handler, decode, queue, compute.

    python benchmarks/vision_latency_split.py                          # default model, 2 reps
    python benchmarks/vision_latency_split.py --models mobilenet_v3_small --reps 3
    python benchmarks/vision_latency_split.py --generator-cpus 0 --workers 1   # generator apart
    python benchmarks/vision_latency_split.py --workers 1 --gateway-variant=--gc-percent=400

The target "p99 at half load <= max queue delay + 2 x batch compute" is judged on the client's
p99; this says which layer the rest of that p99 is spent in. Per model, the setups (one
process, one process behind snaplearn-gateway, and with --workers N > 1 the worker processes
direct and behind the gateway; with --gateway-variant FLAGS, each gateway setup again with
the gateway given FLAGS) run interleaved (a, b, ... then reversed) so that drift in the
machine's load hits all alike. Each is vision_bench.py's measurement (capacity from a closed
loop, then an open loop at half of it, then 3x); around the half-load window both the server's
and the gateway's /metrics are scraped and each latency histogram gives the window's p50 and
p99 (benchmarks/latency_split.py: interpolated inside buckets 2.5-25 ms wide up to 100 ms,
50-150 ms wide up to 500 ms).

Reading the layers (all p50 / p99 ms, medians over repetitions):
  client             the load generator's own measure (exact);
  gateway call       arrival at the gateway to its answer;
  gateway own        per call, the gateway call less its time on the backend: reading the
                     request, writing the answer;
  gateway -> backend handing the request on (its wait for the stream's sender included) to
                     the backend's answer; less `server handler`, that wait, the connection,
                     grpc's core and the event loop's queue in the server;
  server handler     the handler's time (a Classify call or a ClassifyStream item);
  decode, queue wait, batch compute   its parts (batch compute is per batch, not per request);
                     the rest of the handler is waiting on the event loop and thread hand-offs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules, run as a script
from latency_split import LAYER_NAMES
from vision_bench import (
    add_server_arguments,
    alternating,
    bench_ours,
    configured_max_batch_size,
    experiment_setups,
    generator_note,
    load_generator,
    log,
    prepare_models,
    print_median_table,
)


def summary(result: dict[str, Any]) -> dict[str, Any]:
    """One measurement as flat fields: the half-load split (NaN for a layer the setup lacks),
    the half-load rate, the bound the p99 target uses, capacity."""
    half = result["half"]
    row: dict[str, Any] = {
        "capacity": round(result["closed"]["throughput"], 1),
        "half_rate": round(result["rates"]["half"], 1),
        "mean_batch": half["server"].get("mean_batch_size"),
        "batch_compute_mean_ms": half["server"].get("mean_batch_compute_ms"),
        "send_lag_p99_ms": half.get("send_lag_p99_ms"),
    }
    for layer in LAYER_NAMES:
        stats = half["split"].get(layer, {})
        for stat in ("p50_ms", "p99_ms"):
            row[f"{layer}|{stat}"] = round(stats.get(stat, math.nan), 2)
    return row


def layer_cell(layer: str):  # type: ignore[no-untyped-def]
    def cell(median) -> str:  # type: ignore[no-untyped-def]
        p50, p99 = median(f"{layer}|p50_ms"), median(f"{layer}|p99_ms")
        return "-" if math.isnan(p99) else f"{p50:.1f} / {p99:.1f}"

    return cell


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_server_arguments(parser, seconds=8.0, max_batch_size=None)
    parser.set_defaults(models="worksheet-topics")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--gateway-max-in-flight", type=int, default=128, help="the gateway's limit")
    parser.add_argument(
        "--gateway-variant",
        default="",
        help="gateway flags (space-separated) to measure beside its defaults, e.g. --gc-percent=400",
    )
    args = parser.parse_args(argv)
    if args.reps < 1:
        parser.error("--reps must be >= 1")
    experiment = experiment_setups(args, "(this experiment needs the gateway)", args.gateway_max_in_flight)
    settings = experiment.settings
    variant = args.gateway_variant.split()
    # name -> (settings, server flags, gateway flags or None for no gateway)
    setups: dict[str, tuple[Any, list[str], list[str] | None]] = {}
    for name, (server_settings, server_flags) in experiment.servers().items():
        setups[name] = (server_settings, server_flags, None)
        setups[f"{name} + gateway"] = (server_settings, server_flags, [])
        if variant:
            setups[f"{name} + gateway {' '.join(variant)}"] = (server_settings, server_flags, variant)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    rows: dict[tuple[str, str], list[dict[str, Any]]] = {}
    with load_generator(args.load_generator, cpus=args.generator_cpus):
        roots = prepare_models(models)
        for model in models:
            max_batch_size = configured_max_batch_size(roots[model], model)
            for rep in range(args.reps):
                order = alternating(list(setups), rep)
                for setup in order:
                    setup_settings, extra, gateway_flags = setups[setup]
                    log(f"{model}: {setup} (repetition {rep + 1})")
                    result = bench_ours(
                        roots[model], model, setup_settings, max_batch_size, None, extra,
                        gateway=gateway_flags is not None, gateway_extra=gateway_flags or (),
                    )  # fmt: skip
                    row = summary(result)
                    rows.setdefault((model, setup), []).append(row)
                    print(json.dumps({"model": model, "setup": setup, **row}), flush=True)
    print(
        f"half of each setup's capacity, {args.reps} repetition(s), {settings.seconds:g} s windows"
        f"{generator_note(args.generator_cpus)}; p50 / p99 ms, medians"
    )
    print_median_table(
        dict(sorted(rows.items(), key=lambda item: (item[0][0], list(setups).index(item[0][1])))),
        ["model", "setup"],
        [
            ("half load img/s", lambda m: f"{m('half_rate'):.0f}"),
            ("bound ms", lambda m: f"{settings.max_queue_delay_ms + 2 * m('batch_compute_mean_ms'):.1f}"),
            *((layer, layer_cell(layer)) for layer in LAYER_NAMES),
            ("generator send lag p99 ms", lambda m: f"{m('send_lag_p99_ms'):.1f}"),
        ],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
