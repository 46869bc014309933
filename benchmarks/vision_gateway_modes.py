"""Focused experiment: how the gateway carries Classify calls, side by side.

    python benchmarks/vision_gateway_modes.py                 # default model, ~10 minutes
    python benchmarks/vision_gateway_modes.py --models mobilenet_v3_small --reps 1
    python benchmarks/vision_gateway_modes.py --modes per-connection,per-process
    python benchmarks/vision_gateway_modes.py --modes per-process,gc-go --reps 3   # GC target

Modes (`--modes`, default forward,per-process): `forward`, each call forwarded as a call
(`--classify-stream=false`, DECISIONS D19); `per-connection`, items of one ClassifyStream per
backend connection (D20, `--group-by-process=false`); `per-process`, items of one stream per
server process however many connections reach it (D22, the gateway's default, with its GC
target of 400, D24); `gc-go`, per-process with Go's own GC target (`--gc-percent=0`: GOGC,
else 100), the default before D24.
Per model and server setup (one process; `--workers N`, N = --workers, default the CPU count),
the modes run interleaved (a, b, then b, a, ...) so that drift in the machine's load hits all
alike. Each measurement is vision_bench.py's: capacity from a closed loop, then open loops at
half and 3x that capacity (its own). Prints one JSON line per measurement and a median table:
capacity, CPU microseconds per image at capacity (server processes, gateway), p99 at half load,
goodput at 3x as a share of capacity, refusal p99 at 3x.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules, run as a script
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

MODES = {
    "forward": ["--classify-stream=false"],
    "per-connection": ["--classify-stream=true", "--group-by-process=false"],
    "per-process": ["--classify-stream=true", "--group-by-process=true"],
    # The gateway's defaults (per-process) with Go's own GC target instead of its 400 (D24).
    "gc-go": ["--classify-stream=true", "--group-by-process=true", "--gc-percent=0"],
}


def summary(result: dict[str, Any]) -> dict[str, Any]:
    closed, half, overload = result["closed"], result["half"], result["overload"]
    return {
        "capacity": round(closed["throughput"], 1),
        "half_p99_ms": round(half["p99_ms"], 1),
        "goodput_share": round(overload["throughput"] / closed["throughput"], 3),
        "refusal_p99_ms": round(overload["rejected_p99_ms"], 1),
        "send_lag_p99_ms": round(overload["send_lag_p99_ms"], 1),
        "mean_batch": closed["server"].get("mean_batch_size"),
        "server_cpu_us": closed["cpu_us_per_image"]["server"],
        "gateway_cpu_us": closed["cpu_us_per_image"]["gateway"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_server_arguments(parser, seconds=8.0, max_batch_size=None)
    parser.set_defaults(models="worksheet-topics")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--modes", default="forward,per-process", help=f"comma-separated, of {sorted(MODES)}")
    parser.add_argument("--gateway-max-in-flight", type=int, default=128, help="the gateway's limit")
    args = parser.parse_args(argv)
    modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    if not modes or any(mode not in MODES for mode in modes):
        parser.error(f"--modes: choose from {sorted(MODES)}")
    experiment = experiment_setups(args, "(this experiment needs the gateway)", args.gateway_max_in_flight)
    settings, setups = experiment.settings, experiment.servers()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    rows: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    with load_generator(args.load_generator, cpus=args.generator_cpus):
        roots = prepare_models(models)
        for model in models:
            max_batch_size = configured_max_batch_size(roots[model], model)
            for rep in range(args.reps):
                for setup, (setup_settings, extra) in setups.items():
                    order = alternating(modes, rep)
                    for mode in order:
                        log(f"{model}: {setup}, gateway {mode} (repetition {rep + 1})")
                        result = bench_ours(
                            roots[model], model, setup_settings, max_batch_size, None, extra,
                            gateway=True, gateway_extra=MODES[mode],
                        )  # fmt: skip
                        row = summary(result)
                        rows.setdefault((model, setup, mode), []).append(row)
                        print(json.dumps({"model": model, "setup": setup, "mode": mode, **row}), flush=True)
    print(
        f"gateway --max-in-flight {settings.gateway_max_in_flight}, {args.reps} repetition(s), "
        f"{settings.seconds:g} s windows, medians{generator_note(args.generator_cpus)}"
    )
    print_median_table(
        rows,
        ["model", "setup", "gateway"],
        [
            ("capacity img/s", lambda m: f"{m('capacity'):.0f}"),
            (
                "CPU us/img: server, gateway",
                lambda m: f"{m('server_cpu_us'):.0f}, {m('gateway_cpu_us'):.0f}",
            ),
            ("p99 ms at half load", lambda m: f"{m('half_p99_ms'):.1f}"),
            ("goodput at 3x", lambda m: f"{m('goodput_share'):.0%}"),
            ("refusal p99 ms at 3x", lambda m: f"{m('refusal_p99_ms'):.1f}"),
        ],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
