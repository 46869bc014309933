"""Our server as committed at a git ref vs as it is in this checkout, interleaved: an engine change's A/B.

    python benchmarks/vision_ab.py --baseline main~1               # the default model
    python benchmarks/vision_ab.py --baseline v0.3 --reps 3 --no-gateway
    python benchmarks/vision_ab.py --baseline HEAD --candidate-flags="--gil-switch-interval-ms 0.2"
    python benchmarks/vision_ab.py --baseline main --no-one-process --workers 1   # a gateway change

The baseline is checked out (`git worktree add --detach`) under var/bench-runs and its server
runs from there (its packages first on PYTHONPATH), behind its own snaplearn-gateway (built
there, from services/gateway or, in a checkout from before issue 18, clients/go), so that a
change to the gateway is measured too; the candidate is this checkout, with
--candidate-flags added to its server's command line (a setting's A/B: --baseline HEAD). Both get the
same models, load generator, flags and machine, alternating (baseline, candidate, then candidate,
baseline, ...) so that drift in the machine's load hits both alike, and the answer is the
median of each repetition's candidate / baseline ratio (printed after the medians). Setups: one
process, and (unless --no-gateway) --workers N processes behind snaplearn-gateway. Each measurement is
the vision comparison's (snaplearn_bench.ours.bench_ours): capacity from a closed loop with CPU per
photo, then open loops at half and 3x that capacity (its own). Prints one JSON line per
measurement and a median table; with --threads also where each side's CPU per photo went, thread
by thread (named by py-spy, in the peers extra).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

from snaplearn_bench.load import load_generator
from snaplearn_bench.models import configured_max_batch_size, parse_models, prepare_models
from snaplearn_bench.ours import add_server_arguments, bench_ours, experiment_setups, generator_note
from snaplearn_bench.paths import REPO, log
from snaplearn_bench.processes import gateway_binary, git_checkout
from snaplearn_bench.report import alternating, median, print_median_table

CORE_USERS = ("generator", "gateway", "server")  # the process trees whose cores a run reports


def summary(result: dict[str, Any]) -> dict[str, Any]:
    closed, half, overload = result["closed"], result["half"], result["overload"]
    cpu = closed.get("cpu_us_per_image", {})
    return {
        "capacity": round(closed["throughput"], 1),
        "mean_batch": round(closed["server"].get("mean_batch_size", float("nan")), 1),
        "server_cpu_us": cpu.get("server", float("nan")),
        "half_p50_ms": round(half["p50_ms"], 1),
        "half_p99_ms": round(half["p99_ms"], 1),
        "goodput_share": round(overload["throughput"] / closed["throughput"], 3),
        "refusal_p99_ms": round(overload["rejected_p99_ms"], 1),
        # Where the cores went at 3x (what the server did not get bounds its goodput).
        **{f"{name}_cores_3x": overload.get("cpu_cores", {}).get(name, math.nan) for name in CORE_USERS},
        "server_cores_capacity": closed.get("cpu_cores", {}).get("server", math.nan),
    }


RATIO_FIELDS = (
    ("capacity", "capacity"),
    ("server_cpu_us", "server CPU/img"),
    ("half_p99_ms", "half-load p99"),
    ("goodput_share", "goodput at 3x"),
    ("refusal_p99_ms", "refusal p99 at 3x"),
)


def paired_ratios(
    rows: dict[tuple[str, str, str], list[dict[str, Any]]], baseline: str, field: str
) -> dict[tuple[str, str], list[float]]:
    """(model, setup) -> candidate / baseline of `field`, one ratio per repetition.

    The two of a repetition ran back to back, so the machine's drift over the run cancels in
    their ratio; the median of the ratios is the A/B's answer.
    """
    ratios: dict[tuple[str, str], list[float]] = {}
    for (model, setup, code), samples in rows.items():
        if code != "candidate":
            continue
        before = rows.get((model, setup, baseline), [])
        ratios[(model, setup)] = [
            after[field] / base[field] for base, after in zip(before, samples, strict=False) if base[field]
        ]
    return ratios


def own_gateways(codes: dict[str, Path]) -> dict[str, Path]:
    """name -> the snaplearn-gateway built from that name's checkout: each side of the A/B runs
    behind its own gateway, so that a change to the gateway is measured as well."""
    return {name: gateway_binary("--gateway", "or pass --no-gateway", code) for name, code in codes.items()}


def print_ratios(rows: dict[tuple[str, str, str], list[dict[str, Any]]], baseline: str) -> None:
    print("candidate / baseline per repetition (median):")
    per_field = {field: paired_ratios(rows, baseline, field) for field, _ in RATIO_FIELDS}
    print("| model | setup | " + " | ".join(title for _, title in RATIO_FIELDS) + " |")
    print("|---|---|" + "---:|" * len(RATIO_FIELDS))
    for key in per_field["capacity"]:
        cells = []
        for field, _ in RATIO_FIELDS:
            ratios = per_field[field][key]
            each = " ".join(f"{ratio:.2f}" for ratio in ratios)
            cells.append(f"{each} ({statistics.median(ratios):.2f})" if ratios else "-")
        print("| " + " | ".join([*key, *cells]) + " |")


def print_threads(threads: dict[tuple[str, str, str], list[dict[str, float]]]) -> None:
    """Per (model, setup, side): CPU microseconds per photo at capacity, thread by thread (medians)."""
    for (model, setup, code), samples in threads.items():
        labels = sorted({label for sample in samples for label in sample})
        medians = {label: median([sample.get(label, 0.0) for sample in samples]) for label in labels}
        print(f"\n{model}, {setup}, {code}: CPU us per photo at capacity, by thread (medians)")
        print("| thread | CPU us per photo |")
        print("|---|---:|")
        for label, us in sorted(medians.items(), key=lambda item: -item[1]):
            print(f"| {label} | {us:.0f} |")
        print(f"| **all** | **{sum(medians.values()):.0f}** |")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="benchmarks/vision_ab.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_server_arguments(parser, seconds=8.0, max_batch_size=None)
    parser.set_defaults(models="worksheet-topics")
    parser.add_argument("--baseline", required=True, help="git ref of the baseline (e.g. main~1)")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument(
        "--gateway",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure --workers processes behind snaplearn-gateway (needs Go)",
    )
    parser.add_argument(
        "--one-process",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure one process without the gateway (--no-one-process: only the gateway's setup, "
        "e.g. for a change to the gateway)",
    )
    parser.add_argument(
        "--candidate-flags", default="", help="server flags (space-separated) only the candidate gets"
    )
    parser.add_argument(
        "--threads",
        action="store_true",
        help="also read each side's CPU per photo at capacity thread by thread (Linux; py-spy names "
        "the Python threads)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not (args.one_process or args.gateway):
        parser.error("--no-one-process with --no-gateway leaves nothing to measure")
    experiment = experiment_setups(args, "or pass --no-gateway" if args.gateway else None)
    settings = experiment.settings
    setups: dict[str, tuple[Any, list[str], bool]] = {}
    if args.one_process:
        setups["1 process"] = (settings, [], False)
    if settings.gateway is not None:  # even with --workers 1
        setups[f"{experiment.workers_name} + gateway"] = (*experiment.workers, True)
    models = parse_models(args.models)
    rows: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    threads: dict[tuple[str, str, str], list[dict[str, float]]] = {}
    with (
        load_generator(args.load_generator, cpus=args.generator_cpus),
        git_checkout(args.baseline) as baseline,
    ):
        roots = prepare_models(models)
        # The candidate runs from this checkout's sources too (not from whatever checkout the
        # environment's editable install points at).
        codes = {f"baseline ({args.baseline})": baseline, "candidate": REPO}
        gateways = own_gateways(codes) if settings.gateway is not None else {}
        for model in models:
            max_batch_size = configured_max_batch_size(roots[model], model)
            for rep in range(args.reps):
                for setup, (setup_settings, extra, gateway) in setups.items():
                    order = alternating(list(codes), rep)
                    for name in order:
                        log(f"{model}: {setup}, {name} (repetition {rep + 1})")
                        flags = extra + (args.candidate_flags.split() if name == "candidate" else [])
                        # Behind the gateway, each side's own (built from its checkout).
                        side = setup_settings
                        if gateway:
                            side = dataclasses.replace(setup_settings, gateway=gateways[name])
                        result = bench_ours(
                            roots[model], model, side, max_batch_size, None, flags,
                            gateway=gateway, code=codes[name], threads=args.threads,
                        )  # fmt: skip
                        row = summary(result)
                        rows.setdefault((model, setup, name), []).append(row)
                        if args.threads:
                            per_thread = result["closed"].get("thread_cpu_us_per_image", {})
                            threads.setdefault((model, setup, name), []).append(per_thread)
                        print(json.dumps({"model": model, "setup": setup, "code": name, **row}), flush=True)
    candidate = f"; the candidate's server with {args.candidate_flags}" if args.candidate_flags else ""
    print(
        f"{args.reps} repetition(s), {settings.seconds:g} s windows, medians{candidate}"
        f"{generator_note(args.generator_cpus)}"
    )
    print_median_table(
        rows,
        ["model", "setup", "code"],
        [
            ("capacity img/s", lambda m: f"{m('capacity'):.0f}"),
            ("mean batch", lambda m: f"{m('mean_batch'):.1f}"),
            ("server CPU us/img", lambda m: f"{m('server_cpu_us'):.0f}"),
            ("p50 / p99 ms at half load", lambda m: f"{m('half_p50_ms'):.1f} / {m('half_p99_ms'):.1f}"),
            ("goodput at 3x", lambda m: f"{m('goodput_share'):.0%}"),
            ("refusal p99 ms at 3x", lambda m: f"{m('refusal_p99_ms'):.1f}"),
            (
                "cores at 3x: generator / gateway / server (server at capacity)",
                lambda m: (
                    " / ".join(f"{m(f'{name}_cores_3x'):.2f}" for name in CORE_USERS)
                    + f" ({m('server_cores_capacity'):.2f})"
                ),
            ),
        ],
    )
    print_ratios(rows, f"baseline ({args.baseline})")
    if threads:
        print_threads(threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
