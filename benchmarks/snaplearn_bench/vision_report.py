"""The vision comparison's report: markdown tables, target checks and the plot.

    python -m snaplearn_bench.vision_report docs/benchmarks/vision.json   # re-render from saved numbers

Ratios (ours / raw bound, ours / each peer) are taken within each run, where the contenders
ran minutes apart on the same machine, and the median of those ratios is what the targets
check; absolute numbers are medians over runs with every run's value beside them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from snaplearn_bench.cpu import cpu_names
from snaplearn_bench.report import fmt, median, pick
from snaplearn_bench.split import LAYER_NAMES

SERVERS = {
    "ours": "SnapLearn, dynamic batching",
    "ours-workers": "SnapLearn, dynamic batching, worker processes",
    "ours-gateway-one": "SnapLearn, one process behind snaplearn-gateway",
    "ours-gateway": "SnapLearn, worker processes behind snaplearn-gateway",
    "ours-1": "SnapLearn, batching off",
    "ray": "Ray Serve (gRPC)",
    "litserve": "LitServe (HTTP)",
    "triton": "NVIDIA Triton (PyTriton, OIP gRPC)",
}
PEERS = ("ray", "litserve", "triton")
VERDICTS = {True: "met", False: "**missed**", None: "not checked"}
# Our configurations that the targets are checked for, in the targets table's column order.
CONFIGURATIONS = ("ours", "ours-workers", "ours-gateway-one", "ours-gateway")
# What the numbers cannot say: how the tools were obtained, and what was not measured.
NOTES = """\
- perf_analyzer (Triton's own C++ load generator) is the binary of the tritonclient 2.41.0
  manylinux wheel: the `perf-analyzer` project on PyPI is a 0.1.0 placeholder for this
  platform and newer tritonclient wheels no longer ship it. It links libb64 (Debian) and
  libcudart 12 (PyPI) without using a GPU, and drives our Open Inference Protocol endpoint
  unchanged (closed loop, its own stabilisation); its numbers are a cross-check of ours.
- NVIDIA Triton is nvidia-pytriton 0.7.0 from PyPI (Triton's server binary with its Python
  backend; no Docker here), in a venv of its own because it pins numpy<2, seeing torch and our
  engine behind its own packages. The model is bound as PyTriton's documentation shows: one
  instance, Triton's dynamic batcher with the same max batch size and queue delay as everyone,
  its other settings at their defaults (no queue limit); each batch's photos are decoded and
  classified by the same engine code, in the Python process PyTriton hands batches to. It is
  driven over the Open Inference Protocol (ModelInfer, the photo as BYTES input IMAGE), the
  protocol our OIP endpoint speaks too. Its mean batch comes from Triton's metrics
  (nv_inference_count / nv_inference_exec_count). Earlier runs could not load a model:
  the wheel's Python-backend stub links libpython3.11.so dynamically and found the system's
  3.11.2 under this interpreter's 3.11.7 standard library; the benchmark now puts this
  interpreter's own libpython first on LD_LIBRARY_PATH.
- {generator_note}
- The raw bound decodes a batch on the decode threads, then runs the model, one after the
  other; a server that overlaps the two (ours does) can exceed it when the model dominates
  (mobilenet), and, measured minutes apart on a shared machine, the ratio moves with the
  other work on the machine more than with the server.
"""

# The load generator bullet of NOTES, by meta["load_generator"] (runs before it was recorded
# used the Python one).
GENERATOR_NOTES = {
    "go": """\
One load generator for everyone: benchmarks/loadgen (snaplearn-loadgen), a native Go program
  with the semantics and JSON of snaplearn_bench.pyloadgen, built with `go build` at the start of
  the run; a separate process (never inside the server), gRPC for ours and Ray, HTTP for
  LitServe, the Open Inference Protocol over gRPC for Triton. It shares the 2 cores with the
  server it measures; its CPU and its send lag are in the table under each model. It replaced
  the Python generator, which spent about twice the CPU and started open-loop requests up to
  57-185 ms late at 3,000+ requests/s here, so it measured itself (`--load-generator python`
  still runs it). Where the send lag p99 is large, the latency and refusal columns of that row
  measure the generator's queue (and the other work on the shared machine), not the server.""",
    "python": """\
One load generator for everyone: snaplearn_bench.pyloadgen (`--load-generator python`), a
  separate process (never inside the server), gRPC for ours and Ray, HTTP for LitServe. It
  shares the 2 cores with the server it measures; its CPU and its send lag are in the table
  under each model. Where its send lag p99 is hundreds of milliseconds, the latency and
  refusal columns of that row measure the generator's own queue (and the other work on the
  shared machine), not the server: the 3x overload of the small default model asks thousands
  of requests/s of one Python process on the cores that the server needs too. The default, the
  native benchmarks/loadgen, spends less CPU.""",
}
GENERATOR_NAMES = {
    "go": "benchmarks/loadgen, a native Go generator with the same semantics as snaplearn_bench.pyloadgen",
    "python": "snaplearn_bench.pyloadgen, the Python generator",
}


def generator(meta: dict[str, Any]) -> str:
    return str(meta.get("load_generator", "python"))


def cell(runs: list[dict[str, Any]], server: str, path: str, digits: int = 0) -> str:
    """'median (run 1 / run 2 / ...)' of one number over runs."""
    values = [pick(run.get(server, {}), path) for run in runs]
    if len(values) == 1:
        return fmt(values[0], digits)
    return f"{fmt(median(values), digits)} ({' / '.join(fmt(v, digits) for v in values)})"


def ratio(runs: list[dict[str, Any]], numerator: str, denominator: str) -> float:
    """Median over runs of a within-run ratio; paths are 'server:path'."""
    values = []
    for run in runs:
        top = pick(run.get(numerator.split(":")[0], {}), numerator.split(":")[1])
        bottom = pick(run.get(denominator.split(":")[0], {}), denominator.split(":")[1])
        values.append(top / bottom if bottom else float("nan"))
    return median(values)


def header(meta: dict[str, Any], run_count: int) -> list[str]:
    return [
        "# Vision serving benchmark",
        "",
        f"Reproduce: `{meta['command']}` (writes this file, `vision.png` and `vision.json`).",
        "",
        f"Machine: {meta['machine']}, shared with other engineers' work while measured, so absolute",
        f"numbers move between runs: {run_count} run(s); cells show the median and each run's value.",
        "Within a run every contender ran one after the other on the same machine; the targets",
        "use the median of within-run ratios.",
        "",
        f"Settings, the same for every contender: torch with {meta['torch_threads']} intra-op thread(s) "
        "(two stall on OpenMP barriers when the shared machine deschedules one), denormals flushed, "
        "fp32, channels_last, inference_mode, the model traced and frozen (TorchScript); all run our "
        "engine's decode_pixels / predict_pixels, so only the serving layer differs. Every server "
        "batches up to the same size, the model's configured max batch size (what a deployment "
        "uses; the raw bound is the best over batch sizes, so it stays the stronger bound), "
        f"waiting at most {fmt(meta['max_queue_delay_ms'], 0)} ms for a fuller batch. Ours: "
        f"{meta['decode_threads']} decode threads, queue of {meta['max_queue_size']}, events not "
        "published (the peers publish nothing)."
        + (
            f" Worker processes: `--workers {meta['workers']}` behind one port (SO_REUSEPORT), each "
            f"with {meta['worker_decode_threads']} decode thread(s), its own model copy and the same "
            "limits per worker."
            if meta.get("workers", 1) > 1
            else ""
        )
        + (
            " Gateway: snaplearn-gateway (services/gateway; Go, GOMAXPROCS=1) in front of one process "
            "and of the worker processes, refusing inference calls beyond "
            f"{meta['gateway_max_in_flight']} in flight (RESOURCE_EXHAUSTED), and carrying the rest "
            "as items of one ClassifyStream per server process (its 16 connections grouped by the "
            "process each reaches, `--classify-stream` and `--group-by-process`, its defaults; "
            "DECISIONS D20, D22)."
            if meta.get("gateway_max_in_flight")
            else ""
        )
        + (
            f" Its Go GC target: {meta['gateway_gc_percent']} (`--gc-percent`, DECISIONS D24)."
            if meta.get("gateway_max_in_flight") and meta.get("gateway_gc_percent")
            else ""
        ),
        "",
        f"Load ({GENERATOR_NAMES[generator(meta)]}; real JPEG photos of 320x240, ~10 KB): "
        f"capacity is a closed loop of {meta['concurrency']} callers; latency and overload are open "
        "loops (fixed rate, 5 s deadline per request) at half of our (one process) capacity and at "
        "three times it, the same absolute rates for every server (our other configurations: half "
        f"and 3x of their own capacity); {fmt(meta['seconds'], 0)} s windows "
        "after a 3 s warm-up, every request started in the window counted."
        + (
            f" gRPC over {meta['connections']} connections: a closed loop's caller keeps one (one "
            "phone each), an open loop's requests take them in turn."
            if "connections" in meta
            else ""
        )
        + (
            f" The load generator ran alone on CPU(s) {cpu_names(meta['generator_cpus'])} "
            "(`--generator-cpus`, taskset), everything else (servers, gateway, peers, the raw bound) "
            "on the other(s), as if the callers were on machines of their own."
            if meta.get("generator_cpus")
            else ""
        ),
        "",
    ]


def model_section(model: str, runs: list[dict[str, Any]], meta: dict[str, Any]) -> list[str]:
    servers = [name for name in SERVERS if any(name in run for run in runs)]
    lines = [
        f"## {model}",
        "",
        f"Raw bound (decode + preprocess + forward in a loop, no server): {cell(runs, 'raw', 'images_per_s')}"
        f" img/s at batch size {', '.join(str(run['raw']['best_batch_size']) for run in runs)}; "
        f"servers batch up to {', '.join(str(run['max_batch_size']) for run in runs)}.",
        "",
        "| server | capacity img/s | vs raw | p50 / p99 ms at capacity | p99 ms at half load "
        "| goodput img/s at 3x | refusal p99 ms at 3x | mean batch at capacity |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in servers:
        failed = [run[name]["error"] for run in runs if "error" in run.get(name, {})]
        if failed:
            lines.append(
                f"| {SERVERS[name]} | failed in {len(failed)} run(s): {failed[0][:100]} | | | | | | |"
            )
            continue
        batch = "server.mean_batch_size" if name.startswith("ours") else "mean_batch_size_seen"
        vs_raw = ratio(runs, f"{name}:closed.throughput", "raw:images_per_s")
        lines.append(
            f"| {SERVERS[name]} | {cell(runs, name, 'closed.throughput')} | {fmt(100 * vs_raw, 0)}% "
            f"| {cell(runs, name, 'closed.p50_ms')} / {cell(runs, name, 'closed.p99_ms')} "
            f"| {cell(runs, name, 'half.p99_ms')} | {cell(runs, name, 'overload.throughput')} "
            f"| {cell(runs, name, 'overload.rejected_p99_ms', 1)} "
            f"| {cell(runs, name, 'closed.' + batch, 1)} |"
        )
    lines += ["", "Answers other than OK at 3x overload (first run):", ""]
    for name in servers:
        errors = runs[0].get(name, {}).get("overload", {}).get("errors", {})
        lines.append(f"- {SERVERS[name]}: {', '.join(f'{k} {int(v)}' for k, v in errors.items()) or 'none'}")
    lines += [
        "",
        "The load generator's own share (medians): it runs on the same 2 cores, so the CPU it burns",
        "is taken from the server it measures, and a generator that starts requests late (send lag)",
        "measures its own queueing, not the server's:",
        "",
        "| server | generator CPU, cores, at capacity / at 3x | generator send lag p99 ms, half / 3x |",
        "|---|---|---|",
    ]
    for name in servers:
        if any("error" in run.get(name, {}) for run in runs):
            continue
        lines.append(
            f"| {SERVERS[name]} | {cell(runs, name, 'closed.generator_cpu_cores', 2)} / "
            f"{cell(runs, name, 'overload.generator_cpu_cores', 2)} "
            f"| {cell(runs, name, 'half.send_lag_p99_ms', 1)} / "
            f"{cell(runs, name, 'overload.send_lag_p99_ms', 1)} |"
        )
    ours = [name for name in servers if name.startswith("ours") and "error" not in runs[0].get(name, {})]
    if any("cpu_us_per_image" in run.get(name, {}).get("closed", {}) for run in runs for name in ours):
        lines += [
            "",
            "CPU per photo at capacity, microseconds (user + system, every thread of the process tree,",
            "over the closed loop; on 2 cores a server at C img/s can spend at most 2,000,000 / C in all).",
            f"The raw bound spends {cell(runs, 'raw', 'cpu_us_per_image')} per photo on its decode and "
            "model threads, without a server:",
            "",
            "| server | server processes | gateway | load generator |",
            "|---|---|---|---|",
        ]
        for name in ours:
            gateway = (
                cell(runs, name, "closed.cpu_us_per_image.gateway")
                if "gateway" in runs[0][name]["closed"].get("cpu_us_per_image", {})
                else "-"
            )
            lines.append(
                f"| {SERVERS[name]} | {cell(runs, name, 'closed.cpu_us_per_image.server')} | {gateway} "
                f"| {cell(runs, name, 'closed.cpu_us_per_image.generator')} |"
            )
    lines += overload_cores(runs, ours)
    lines += half_load_split(runs, ours)
    half = runs[0]["ours"]["half"].get("server", {})
    lines += [
        "",
        f"Our batch-size distribution at capacity (share of batches, first run): "
        f"{runs[0]['ours']['closed'].get('server', {}).get('batch_size_share')}; at half load the mean "
        f"batch is {fmt(half.get('mean_batch_size'))} and takes {fmt(half.get('mean_batch_compute_ms'))} ms.",
        "",
    ]
    analyzer = [run["ours"].get("perf_analyzer", {}) for run in runs]
    good = [pa for pa in analyzer if "throughput" in pa]
    if good:
        lines.append(
            f"perf_analyzer against our OIP endpoint, concurrency {meta['concurrency']}: "
            f"{' / '.join(fmt(pa['throughput']) for pa in good)} infer/s, p99 "
            f"{' / '.join(fmt(pa['p99_ms'], 0) for pa in good)} ms."
        )
    elif analyzer and analyzer[0]:
        lines.append(f"perf_analyzer failed: `{analyzer[0].get('error', '')[-200:]}`")
    return [*lines, "", *targets(runs), ""]


def half_load_split(runs: list[dict[str, Any]], ours: list[str]) -> list[str]:
    """Where each of our configurations spends its half-load latency, layer by layer."""
    measured = [name for name in ours if any("split" in run.get(name, {}).get("half", {}) for run in runs)]
    if not measured:
        return []
    layers = LAYER_NAMES
    lines = [
        "",
        "Where the half-load latency goes: p50 / p99 ms per layer (medians over runs; the client's",
        "exact, the others read from the processes' histograms, snaplearn_bench.split).",
        "`gateway own` is each call's time in the gateway less its time on the backend; the server",
        "handler's parts are decode, queue wait and batch compute (per batch); the rest of the",
        "handler is the event loop's queue and the thread hand-offs:",
        "",
        f"| server | {' | '.join(layers)} |",
        "|---|" + "---|" * len(layers),
    ]
    for name in measured:
        cells = []
        for layer in layers:
            p50 = median([pick(run.get(name, {}), f"half.split.{layer}.p50_ms") for run in runs])
            p99 = median([pick(run.get(name, {}), f"half.split.{layer}.p99_ms") for run in runs])
            cells.append("-" if p99 != p99 else f"{fmt(p50)} / {fmt(p99)}")
        lines.append(f"| {SERVERS[name]} | {' | '.join(cells)} |")
    return lines


def overload_cores(runs: list[dict[str, Any]], ours: list[str]) -> list[str]:
    """Where the 2 cores went at 3x overload, per configuration of ours that measured it: the
    generator's and the gateway's cores are not the server's, which bounds the goodput."""
    measured = [name for name in ours if all("cpu_cores" in run[name]["overload"] for run in runs)]
    if not measured:
        return []
    lines = [
        "",
        "Where the cores went at 3x overload (average cores over the open loop, every thread of",
        "each process tree): what the generator sends and the gateway refuses is CPU the server",
        "does not get, so goodput at 3x can reach at most about the server's cores at 3x over its",
        "cores at capacity:",
        "",
        "| server | load generator | gateway | server processes | server at capacity |",
        "|---|---|---|---|---|",
    ]
    for name in measured:
        gateway = "gateway" in runs[0][name]["overload"]["cpu_cores"]
        lines.append(
            f"| {SERVERS[name]} | {cell(runs, name, 'overload.cpu_cores.generator', 2)} "
            f"| {cell(runs, name, 'overload.cpu_cores.gateway', 2) if gateway else '-'} "
            f"| {cell(runs, name, 'overload.cpu_cores.server', 2)} "
            f"| {cell(runs, name, 'closed.cpu_cores.server', 2)} |"
        )
    return lines


def target_checks(runs: list[dict[str, Any]], ours: str) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met) for one of our CONFIGURATIONS; met is None where nothing was
    measured to check it against (no peer ran)."""
    peers = [p for p in PEERS if all(p in run and "error" not in run[p] for run in runs)]
    delay_ms = pick(runs[0], "max_queue_delay_ms")
    half_p99 = median([pick(run[ours], "half.p99_ms") for run in runs])
    compute = median([pick(run[ours], "half.server.mean_batch_compute_ms") for run in runs])
    bound = delay_ms + 2 * compute
    vs_raw = ratio(runs, f"{ours}:closed.throughput", "raw:images_per_s")
    vs_peers = {p: ratio(runs, f"{ours}:closed.throughput", f"{p}:closed.throughput") for p in peers}
    refusal = median([pick(run[ours], "overload.rejected_p99_ms") for run in runs])
    goodput = ratio(runs, f"{ours}:overload.throughput", f"{ours}:closed.throughput")
    gain = ratio(runs, f"{ours}:closed.throughput", "ours-1:closed.throughput")
    return [
        ("capacity >= 90% of the raw bound", f"{fmt(100 * vs_raw, 0)}%", vs_raw >= 0.9),
        (
            "capacity above every peer",
            ", ".join(f"{fmt(r, 2)}x {p}" for p, r in vs_peers.items()) or "no peer ran",
            all(r > 1 for r in vs_peers.values()) if vs_peers else None,
        ),
        (
            "p99 at half load <= max queue delay + 2 x batch compute",
            f"{fmt(half_p99, 0)} ms vs {fmt(delay_ms, 0)} + 2 x {fmt(compute, 1)} = {fmt(bound, 0)} ms",
            half_p99 <= bound,
        ),
        ("refusals at 3x overload answered in < 10 ms at p99", f"{fmt(refusal, 1)} ms", refusal < 10),
        ("goodput at 3x overload >= 90% of capacity", f"{fmt(100 * goodput, 0)}%", goodput >= 0.9),
        ("dynamic batching vs batching off (one process)", f"{fmt(gain, 2)}x the capacity", gain > 1),
    ]


def targets(runs: list[dict[str, Any]]) -> list[str]:
    configurations = [c for c in CONFIGURATIONS if all(c in run for run in runs)]
    checks = {c: target_checks(runs, c) for c in configurations}
    workers = runs[0].get("workers", "?")
    names = {
        "ours": "one process",
        "ours-workers": f"{workers} worker processes",
        "ours-gateway-one": "one process behind the gateway",
        "ours-gateway": f"{workers} worker processes behind the gateway",
    }
    lines = [
        "Targets (medians of within-run ratios; each configuration's half and 3x loads are of its own "
        "capacity):",
        "",
        "| target | " + " | ".join(names[c] for c in configurations) + " |",
        "|---|" + "---|" * len(configurations),
    ]
    for row, (target, _, _) in enumerate(checks["ours"]):
        cells = [f"{VERDICTS[checks[c][row][2]]}: {checks[c][row][1]}" for c in configurations]
        lines.append(f"| {target} | " + " | ".join(cells) + " |")
    return lines


def report(runs: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = header(meta, len(runs))
    for model in runs[0]:
        lines += model_section(model, [run[model] for run in runs], meta)
    notes = NOTES.format(generator_note=GENERATOR_NOTES[generator(meta)])
    lines += ["![capacity of each server, with the raw bound](vision.png)", "", "## Notes", "", notes]
    lines.append(f"This run: {meta['notes']}.")
    return "\n".join(lines) + "\n"


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(runs[0])
    fig, axes = plt.subplots(1, len(models), figsize=(8.5 * len(models), 4.8), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        per_run = [run[model] for run in runs]
        names = [n for n in SERVERS if all(n in r and "error" not in r[n] for r in per_run)]
        values = [median([pick(r[n], "closed.throughput") for r in per_run]) for n in names]
        labels = [SERVERS[n].replace(", ", "\n").replace(" (", "\n(") for n in names]
        colors = ["#2a7", "#175", "#396", "#4b9", "#8c8", "#57c", "#c75", "#76b900"]
        ax.bar(labels, values, color=colors[: len(names)])
        raw = median([pick(r["raw"], "images_per_s") for r in per_run])
        ax.axhline(raw, color="k", linestyle="--", label="raw bound (no server)")
        ax.set_title(f"{model}: capacity, closed loop (median of runs)")
        ax.set_ylabel("images / s")
        ax.tick_params(axis="x", labelsize=8)
        ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write(runs: list[dict[str, Any]], meta: dict[str, Any], out: Path) -> None:
    """vision.json, vision.md and (where matplotlib is installed: the peers extra) vision.png."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "vision.json").write_text(json.dumps({"meta": meta, "runs": runs}, indent=1))
    (out / "vision.md").write_text(report(runs, meta))
    try:
        plot(runs, out / "vision.png")
    except ImportError as error:
        print(f"vision.png not drawn ({error}; pip install matplotlib)", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    path = Path((argv if argv is not None else sys.argv[1:])[0])
    saved = json.loads(path.read_text())
    (path.parent / "vision.md").write_text(report(saved["runs"], saved["meta"]))
    plot(saved["runs"], path.parent / "vision.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
