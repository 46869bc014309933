"""One network in every format: the bare runtime's bound against our server serving that file,
and the peers on the same network, side by side in one run.

    python benchmarks/model_formats.py                       # ResNet-50, MobileNetV3, default model
    python benchmarks/model_formats.py --models resnet50 --formats onnx,torchscript --seconds 5
    python benchmarks/model_formats.py --quick --no-write    # MobileNetV3-small 64x64: a smoke run

Per model (torchvision ones with seeded random weights at 224x224: serving cost does not depend
on the weights; the default model with its trained weights), in a process of its own: export to
TorchScript (torch.jit.trace), an ExportedProgram (torch.export, dynamic batch, .pt2) and ONNX
(dynamic batch), and write each into a scratch model repository as a version folder (what
`snaplearn-vision models add` writes; --models-add runs that command instead). Then per format,
one after the other:

- raw: the format's bare runtime (snaplearn_bench.format_runtime: torch.jit.load,
  torch.export.load, onnxruntime) on a preprocessed batch, at each --batch-sizes, with the
  server's --torch-threads; the best is the bound;
- ours: `python -m snaplearn_vision.main` serving that version: capacity (closed loop of
  --concurrency Classify callers, real JPEG photos) and p99 at half of that rate (open loop).

Then the peers on --peer-models (NVIDIA Triton via PyTriton, Ray Serve, LitServe:
snaplearn_bench.peers and peer_servers, the code vision_bench.py runs), one after the other,
each with its own dynamic batching (the same max batch and delay as ours) and serving the
version folder of --peer-format (default: this run's fastest bare runtime of that model)
through our engine, the same decode and forward code as our server: only the serving layer
differs. Capacity with our callers, and p99 at our half-load rate (the same offered load). A
peer that is not installed is named so in the table (--install-peers installs them, as
vision_bench.py does).

Writes docs/benchmarks/model_formats.json, model_formats.png (matplotlib, when installed) and
the section of docs/benchmarks/model_formats.md between its markers (the page's reading, written
by hand, stays around it).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from snaplearn_bench.paths import DOCS, MODELS_DIR, PY, log

FORMATS = ("torchscript", "torch_export", "onnx", "state_dict")
DEFAULT_FORMATS = "torchscript,torch_export,onnx"
DEFAULT_MODELS = "resnet50,mobilenet_v3_large,worksheet-topics"
PEER_NAMES = ("triton", "ray", "litserve")
TARGET_MODEL = "resnet50"
TARGET_RATIO = 0.9  # issue 19: our capacity >= 90% of the best raw bound for ResNet-50
BEGIN, END = "<!-- model_formats: begin -->", "<!-- model_formats: end -->"


# -- measuring ------------------------------------------------------------------------------------


def _json_line(argv: list[str], env: dict[str, str], what: str) -> dict[str, Any]:
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed ({done.returncode}): {done.stderr[-2000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def _env(args: argparse.Namespace) -> dict[str, str]:
    """torch_env, keeping this process's PYTHONPATH (benchmarks/gpu.sh runs from the source
    folders, nothing installed)."""
    from snaplearn_bench.processes import torch_env

    env = torch_env(args.torch_threads)
    inherited = os.environ.get("PYTHONPATH", "")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH", ""), inherited]))
    return env


def export(model: str, root: Path, formats: list[str], args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Export `model` into `out` (reusing an earlier export there: --export-dir) and, unless
    --models-add, write each file into the repository `root` as a version folder."""
    from snaplearn_bench.format_runtime import served_name, write_version

    cache = out / f"{model}-{args.size}.export.json"
    exported: dict[str, Any] | None = json.loads(cache.read_text()) if cache.exists() else None
    if exported is None or not all(
        Path(exported["files"].get(fmt, "/nonexistent")).exists() for fmt in formats
    ):
        argv = [
            PY, "-m", "snaplearn_bench.format_runtime", "export", "--model", model,
            "--out", str(out), "--formats", ",".join(formats),
            "--default-root", str(args.model_repository), "--size", str(args.size),
        ]  # fmt: skip
        exported = _json_line(argv, _env(args), f"exporting {model}")
        cache.write_text(json.dumps(exported))
    else:
        log(f"{model}: reusing the export in {out}")
    if not args.models_add:
        for fmt in exported["files"]:
            file = exported["files"][fmt]
            write_version(root, served_name(model, fmt), file, fmt, exported["spec"], args.max_batch_size)
    return exported


def models_add(
    root: Path, name: str, file: str, fmt: str, spec: dict[str, Any], args: argparse.Namespace
) -> float:
    """`snaplearn-vision models add` (the user's command: copy, load, probe); its wall time."""
    labels = root.parent / f"{name}.labels.txt"
    labels.write_text("\n".join(spec["labels"]) + "\n")
    argv = [
        PY, "-m", "snaplearn_vision.main", "models", "--repository", str(root), "add", name,
        "--file", file, "--labels", str(labels), "--format", fmt,
        "--input-size", *map(str, spec["size"]), "--channels", str(spec["channels"]),
        "--mean", *map(str, spec["mean"]), "--std", *map(str, spec["std"]),
        "--max-batch-size", str(args.max_batch_size),
    ]  # fmt: skip
    if fmt == "state_dict":
        argv += ["--architecture", spec["architecture"]]
    started = time.perf_counter()
    done = subprocess.run(argv, env=_env(args), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"models add {name} failed: {done.stderr[-2000:]}")
    return time.perf_counter() - started


def bare(file: str, fmt: str, spec: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    argv = [
        PY, "-m", "snaplearn_bench.format_runtime", "bare", "--file", file, "--format", fmt,
        "--spec", json.dumps(spec), "--batch-sizes", args.batch_sizes, "--seconds", str(args.raw_seconds),
        "--torch-threads", str(args.torch_threads), "--device", args.device, "--dtype", args.precision,
        *(["--channels-last"] if args.channels_last else []),
    ]  # fmt: skip
    return _json_line(argv, _env(args), f"the bare {fmt} runtime")


@contextlib.contextmanager
def our_server(root: Path, name: str, scratch: Path, args: argparse.Namespace) -> Iterator[str]:
    from snaplearn_bench.processes import free_port, ready_file_process

    ready = scratch / f"ready-{name}.json"
    argv = [
        PY, "-m", "snaplearn_vision.main", "--no-publish", "--spool-dir", "",
        "--port", str(free_port()), "--metrics-port", str(free_port()),
        "--model-repository", str(root), "--model-name", name, "--model-version", "1",
        "--device", args.device, "--precision", args.precision,
        "--channels-last" if args.channels_last else "--no-channels-last",
        "--torch-threads", str(args.torch_threads), "--decode-threads", str(args.decode_threads),
        "--max-batch-size", str(args.max_batch_size), "--max-queue-delay-ms", str(args.max_queue_delay_ms),
        "--ready-file", str(ready), "--log-level", "WARNING",
    ]  # fmt: skip
    log_path = scratch / f"vision-{name}.log"
    with ready_file_process(
        f"vision server ({name})", argv, ready, log_path, _env(args), timeout_s=600
    ) as proc:
        yield proc.target
    time.sleep(0.5)  # let the CPU settle before the next contender


def capacity_and_half(
    target: str, protocol: str, args: argparse.Namespace, model: str = "", rate: float | None = None
) -> dict[str, Any]:
    """A closed loop (capacity), then an open loop at half of it (or at `rate`): the latency
    a server gives when it is not saturated."""
    from snaplearn_bench.load import load

    common: dict[str, Any] = {"connections": args.connections, "model": model, "warmup_s": args.warmup}
    closed = load(
        target, protocol, "closed", args.seconds, concurrency=args.concurrency, timeout_s=60, **common
    )
    half_rate = rate if rate is not None else max(closed["throughput"] / 2, 0.5)
    half = load(target, protocol, "open", args.seconds, rate=half_rate, timeout_s=60, **common)
    return {
        "capacity": closed["throughput"],
        "p50_ms": closed["p50_ms"],
        "p99_ms": closed["p99_ms"],
        "mean_batch": closed.get("mean_batch_size_seen", float("nan")),
        "half_rate": half_rate,
        "half_p50_ms": half["p50_ms"],
        "half_p99_ms": half["p99_ms"],
        "errors": _merge_errors(closed.get("errors", {}), half.get("errors", {})),
    }


def _merge_errors(*counts: dict[str, int]) -> dict[str, int]:
    merged: dict[str, int] = {}
    for count in counts:
        for code, n in count.items():
            merged[code] = merged.get(code, 0) + int(n)
    return merged


def ours(root: Path, name: str, scratch: Path, args: argparse.Namespace) -> dict[str, Any]:
    with our_server(root, name, scratch, args) as target:
        return capacity_and_half(target, "grpc", args)


# What each peer runs, for the page (the network itself: the version folder it is given).
PEER_RUNS = {
    "triton": "NVIDIA Triton through PyTriton: tritonserver's dynamic batcher and gRPC OIP, one "
    "model instance whose Python callable runs our engine's decode + forward",
    "ray": "Ray Serve: its gRPC proxy (our Classify proto), one replica, @serve.batch around our "
    "engine's decode + forward",
    "litserve": "LitServe: HTTP JSON (photo base64), one worker, LitAPI batching, our engine's decode "
    "per request and forward per batch",
}


def peer_setup(install: bool) -> tuple[dict[str, str | None], Path | None, dict[str, str]]:
    """(peer -> None (runnable) or why it is not run, Triton's python, Triton's environment),
    installing the peers first if asked (the code vision_bench.py runs)."""
    from snaplearn_bench.peers import TRITON_VENV, ensure_triton

    if install:
        from snaplearn_bench.vision_bench import ensure_peers_extra

        ensure_peers_extra()
    status: dict[str, str | None] = {}
    for peer, module in (("ray", "ray"), ("litserve", "litserve")):
        status[peer] = (
            None if importlib.util.find_spec(module) else f"not installed ({module}; --install-peers)"
        )
    triton_python: Path | None = None
    triton_env: dict[str, str] = {}
    if install or (TRITON_VENV / "bin" / "python").exists():
        triton_python, triton_env, note = ensure_triton()  # installs only when asked or broken
        status["triton"] = None if triton_python is not None else note
    else:
        status["triton"] = "not installed (nvidia-pytriton venv; --install-peers)"
    return status, triton_python, triton_env


def peer_format(entry: dict[str, Any], wanted: str) -> str | None:
    """The format the peers serve: `wanted`, or with "best" the fastest bare runtime measured
    for this model in this run (None: nothing measured)."""
    if wanted != "best":
        return wanted
    raws = {
        fmt: row["raw"]["images_per_s"]
        for fmt, row in entry["formats"].items()
        if "raw" in row and "ours" in row
    }
    return max(raws, key=lambda fmt: raws[fmt]) if raws else None


def peers(
    root: Path,
    name: str,
    fmt: str,
    half_rate: float,
    setup: tuple[dict[str, str | None], Path | None, dict[str, str]],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Each runnable peer serving version folder `name` (format `fmt`): capacity (closed loop,
    our callers) and p99 at `half_rate` (our half load: the same offered rate), --reps times."""
    from snaplearn_bench.ours import Settings
    from snaplearn_bench.peers import bench_peer

    statuses, triton_python, triton_env = setup
    settings = Settings(
        seconds=args.seconds, concurrency=args.concurrency, torch_threads=args.torch_threads,
        decode_threads=args.decode_threads, max_queue_size=256, max_batch_size=args.max_batch_size,
        max_queue_delay_ms=args.max_queue_delay_ms, peers=True, perf_analyzer=None, perf_env={},
        connections=args.connections, triton_python=triton_python, triton_env=triton_env,
    )  # fmt: skip
    results: dict[str, Any] = {}
    for peer in PEER_NAMES:
        if statuses.get(peer):
            results[peer] = {"status": statuses[peer]}
            continue
        reps = []
        try:
            for rep in range(args.reps):
                log(f"{name}: {peer} (rep {rep + 1} of {args.reps})")
                measured = bench_peer(
                    peer, root, name, settings, args.max_batch_size, (half_rate, 0.0),
                    timeout_s=60, warmup_s=args.warmup,
                )  # fmt: skip
                closed, half = measured["closed"], measured.get("half", {})
                reps.append(
                    {
                        "capacity": closed["throughput"],
                        "p99_ms": closed["p99_ms"],
                        "mean_batch": closed.get("mean_batch_size_seen", float("nan")),
                        "half_rate": half_rate,
                        "half_p99_ms": half.get("p99_ms", float("nan")),
                        "errors": _merge_errors(closed.get("errors", {}), half.get("errors", {})),
                    }
                )
        except Exception as error:  # a peer that fails to start is reported, not fatal
            results[peer] = {"status": f"failed: {type(error).__name__}: {str(error)[-300:]}"}
            continue
        results[peer] = {**median_of(reps), "format": fmt, "runs": PEER_RUNS[peer]}
    return results


def median_of(reps: list[dict[str, Any]]) -> dict[str, Any]:
    """The per-key median of repeated measurements (numbers), errors summed, reps kept."""
    if len(reps) == 1:
        return dict(reps[0])
    merged: dict[str, Any] = {}
    for key, value in reps[0].items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            merged[key] = statistics.median(rep[key] for rep in reps)
        elif key == "errors":
            merged[key] = _merge_errors(*(rep[key] for rep in reps))
        else:
            merged[key] = value
    merged["reps"] = reps
    return merged


def run(args: argparse.Namespace) -> dict[str, Any]:
    formats = parse_list(args.formats)
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise SystemExit(f"unknown formats {unknown}; known: {', '.join(FORMATS)}")
    models = parse_list(args.models)
    peer_models = set(parse_list(args.peer_models))
    setup: tuple[dict[str, str | None], Path | None, dict[str, str]] = (
        peer_setup(args.install_peers)
        if args.peers
        else (dict.fromkeys(PEER_NAMES, "not run (--no-peers)"), None, {})
    )
    result: dict[str, Any] = {"meta": meta(args), "models": {}}
    with tempfile.TemporaryDirectory(prefix="model-formats-") as scratch_name:
        scratch = Path(scratch_name)
        for model in models:
            if model == "worksheet-topics" and not (args.model_repository / model).is_dir():
                from snaplearn_bench.models import ensure_default_model

                ensure_default_model(args.model_repository)
            reps = reps_for(args, model)
            exported_formats = sorted(set(formats), key=FORMATS.index)
            root = scratch / "models"
            log(f"{model}: exporting to {', '.join(exported_formats)}")
            out = args.export_dir if args.export_dir is not None else scratch / "files"
            out.mkdir(parents=True, exist_ok=True)
            exported = export(model, root, exported_formats, args, out)
            spec = exported["spec"]
            entry: dict[str, Any] = {
                "input": f"{spec['channels']}x{spec['size'][0]}x{spec['size'][1]}",
                "architecture": spec["architecture"],
                "reps": reps,
                "formats": {},
            }
            for fmt in formats:
                from snaplearn_bench.format_runtime import served_name

                name = served_name(model, fmt)
                if fmt in exported.get("failed", {}):
                    entry["formats"][fmt] = {"failed": exported["failed"][fmt]}
                    log(f"{model} {fmt}: {exported['failed'][fmt]}")
                    continue
                row: dict[str, Any] = {"export_s": exported["export_s"][fmt]}
                if args.models_add:
                    log(f"{model} {fmt}: models add")
                    row["models_add_s"] = models_add(root, name, exported["files"][fmt], fmt, spec, args)
                try:
                    log(f"{model} {fmt}: bare runtime")
                    row["raw"] = median_of(
                        [bare(exported["files"][fmt], fmt, spec, args) for _ in range(reps)]
                    )
                    row["window_s"] = window_s(args, row["raw"]["images_per_s"])
                    served_args = argparse.Namespace(**{**vars(args), "seconds": row["window_s"]})
                    log(f"{model} {fmt}: our server ({row['window_s']:.1f} s windows)")
                    row["ours"] = median_of([ours(root, name, scratch, served_args) for _ in range(reps)])
                except Exception as error:  # one format that fails is a row that says so
                    row["failed"] = f"{type(error).__name__}: {str(error)[-600:]}"
                    log(f"{model} {fmt}: failed: {row['failed']}")
                entry["formats"][fmt] = row
            if model in peer_models:
                entry["peers"] = run_peers(
                    model, entry, root, setup, argparse.Namespace(**{**vars(args), "reps": reps})
                )
            result["models"][model] = entry
            if not args.no_write:  # what is measured so far survives a run cut short (--from-json)
                args.out.mkdir(parents=True, exist_ok=True)
                (args.out / "model_formats.partial.json").write_text(json.dumps(result, indent=2) + "\n")
    result["meta"]["load_average_1m_end"] = round(os.getloadavg()[0], 1)
    return summarize(result)


def run_peers(
    model: str,
    entry: dict[str, Any],
    root: Path,
    setup: tuple[dict[str, str | None], Path | None, dict[str, str]],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """The peers on `model` in the format --peer-format picks, at our best served half rate."""
    from snaplearn_bench.format_runtime import served_name

    statuses = setup[0]
    if all(statuses.get(peer) for peer in PEER_NAMES):  # none runnable (--no-peers, not installed)
        return {peer: {"status": statuses[peer]} for peer in PEER_NAMES}
    fmt = peer_format(entry, args.peer_format)
    if fmt is None or not (root / served_name(model, fmt)).is_dir():
        why = f"not run (no {fmt} version of {model} measured)" if fmt else "not run (nothing measured)"
        return {peer: {"status": statuses.get(peer) or why} for peer in PEER_NAMES}
    served = [row["ours"] for row in entry["formats"].values() if "ours" in row]
    half_rate = max(row["half_rate"] for row in served) if served else 0.0
    # The windows of the served format's rows: the peers are counted over as many batches as ours.
    seconds = entry["formats"].get(fmt, {}).get("window_s", args.seconds)
    peer_args = argparse.Namespace(**{**vars(args), "seconds": seconds})
    return peers(root, served_name(model, fmt), fmt, half_rate, setup, peer_args)


def window_s(args: argparse.Namespace, raw_rate: float) -> float:
    """A load window long enough to hold --min-batches full batches at the bare rate (a closed
    loop's answers come a batch at a time, so a short window's count is a batch off), between
    --seconds and 3x --seconds."""
    if args.min_batches <= 0 or not raw_rate > 0:
        return float(args.seconds)
    wanted = args.min_batches * args.max_batch_size / raw_rate
    return float(round(min(max(args.seconds, wanted), 3 * args.seconds), 1))


def reps_for(args: argparse.Namespace, model: str) -> int:
    """--reps for the models of --reps-models (all when empty), one for the others."""
    chosen = parse_list(args.reps_models)
    return args.reps if not chosen or model in chosen else 1


# -- the report (pure: tested in tests/unit/test_bench_model_formats.py) ------------------------


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """Add the ratios: per format ours / own raw and ours / the model's best raw bound; per
    model the fastest raw format and its lead over the slowest, the best served format, and for
    ResNet-50 the target verdict (>= 90% of the best raw bound, above every measured peer)."""
    for entry in result["models"].values():
        measured = {fmt: row for fmt, row in entry["formats"].items() if "raw" in row and "ours" in row}
        if not measured:
            entry["summary"] = {"measured": False}
            continue
        raws = {fmt: row["raw"]["images_per_s"] for fmt, row in measured.items()}
        served = {fmt: row["ours"]["capacity"] for fmt, row in measured.items()}
        best_raw_format = max(raws, key=lambda fmt: raws[fmt])
        best_raw = raws[best_raw_format]
        slowest_raw_format = min(raws, key=lambda fmt: raws[fmt])
        for fmt, row in measured.items():
            row["ours_vs_own_raw"] = _ratio(served[fmt], raws[fmt])
            row["ours_vs_best_raw"] = _ratio(served[fmt], best_raw)
        best_served_format = max(served, key=lambda fmt: served[fmt])
        summary: dict[str, Any] = {
            "measured": True,
            "best_raw_format": best_raw_format,
            "best_raw_images_per_s": best_raw,
            "raw_lead_over_slowest": _ratio(best_raw, raws[slowest_raw_format]),
            "slowest_raw_format": slowest_raw_format,
            # The fastest's lead over each other format, fastest first.
            "raw_lead_over": {
                fmt: _ratio(best_raw, raws[fmt])
                for fmt in sorted(raws, key=lambda fmt: -raws[fmt])
                if fmt != best_raw_format
            },
            "best_served_format": best_served_format,
            "best_served_images_per_s": served[best_served_format],
            "best_served_vs_best_raw": _ratio(served[best_served_format], best_raw),
        }
        peer_caps = {
            peer: values["capacity"]
            for peer, values in entry.get("peers", {}).items()
            if "capacity" in values
        }
        for values in entry.get("peers", {}).values():
            if "capacity" in values:
                values["vs_best_raw"] = _ratio(values["capacity"], best_raw)
        summary["peers_measured"] = sorted(peer_caps)
        if peer_caps:
            best_peer = max(peer_caps, key=lambda peer: peer_caps[peer])
            summary["best_peer"] = best_peer
            summary["best_peer_images_per_s"] = peer_caps[best_peer]
            summary["ours_vs_best_peer"] = _ratio(served[best_served_format], peer_caps[best_peer])
        summary["above_every_measured_peer"] = all(
            served[best_served_format] > cap for cap in peer_caps.values()
        )
        summary["meets_target"] = summary["best_served_vs_best_raw"] >= TARGET_RATIO
        entry["summary"] = summary
    return result


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else float("nan")


def _num(value: float, digits: int = 1) -> str:
    return "n/a" if value != value else f"{value:.{digits}f}"  # NaN != NaN


def _cell(text: str, limit: int = 160) -> str:
    """A message as one table cell: one line, no pipes, its last `limit` characters (where a
    traceback says what went wrong)."""
    flat = " ".join(text.replace("|", "/").split())
    return flat if len(flat) <= limit else "..." + flat[-limit:]


def _errors(counts: dict[str, int]) -> str:
    return ", ".join(f"{code} {n}" for code, n in counts.items()) or "0"


def markdown_table(result: dict[str, Any]) -> str:
    """One table: per model, a row per format (bare raw bound, our server) and per peer (the
    format it serves; its half load is ours, so the p99s are at the same offered rate)."""
    lines = [
        "| model | served as | raw bound img/s (batch) | capacity img/s | mean batch | / own raw "
        "| / best raw | half-load rate /s | half-load p99 ms | errors |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model, entry in result["models"].items():
        label = f"{model} ({entry['input']})"
        for fmt, row in entry["formats"].items():
            if "failed" in row or "raw" not in row:
                lines.append(
                    f"| {label} | ours, {fmt} | failed: {_cell(row.get('failed', '?'))} | | | | | | | |"
                )
                continue
            raw, served = row["raw"], row["ours"]
            lines.append(
                f"| {label} | ours, {fmt} | {_num(raw['images_per_s'])} ({int(raw['best_batch_size'])}) "
                f"| {_num(served['capacity'])} | {_num(served.get('mean_batch', float('nan')))} "
                f"| {row['ours_vs_own_raw']:.0%} | {row['ours_vs_best_raw']:.0%} "
                f"| {_num(served['half_rate'])} | {_num(served['half_p99_ms'])} "
                f"| {_errors(served['errors'])} |"
            )
        for peer, values in entry.get("peers", {}).items():
            if "capacity" in values:
                lines.append(
                    f"| {label} | {peer}, {values.get('format', '?')} | | {_num(values['capacity'])} "
                    f"| {_num(values.get('mean_batch', float('nan')))} | | {values['vs_best_raw']:.0%} "
                    f"| {_num(values.get('half_rate', float('nan')))} "
                    f"| {_num(values.get('half_p99_ms', float('nan')))} "
                    f"| {_errors(values.get('errors', {}))} |"
                )
            else:
                lines.append(f"| {label} | {peer} | {_cell(values['status'])} | | | | | | | |")
    return "\n".join(lines)


def peer_notes(result: dict[str, Any]) -> list[str]:
    """What each measured peer ran, once per peer."""
    notes: dict[str, str] = {}
    for entry in result["models"].values():
        for peer, values in entry.get("peers", {}).items():
            if "runs" in values and peer not in notes:
                notes[peer] = f"{peer}: {values['runs']}, on the {values.get('format', '?')} version folder"
    return list(notes.values())


def verdicts(result: dict[str, Any]) -> list[str]:
    """The sentences the page leads with: fastest raw format and by how much, and the target."""
    sentences = []
    for model, entry in result["models"].items():
        summary = entry.get("summary", {})
        if not summary.get("measured"):
            sentences.append(f"{model}: not measured (every format failed).")
            continue
        sentence = (
            f"{model}: fastest bare runtime **{summary['best_raw_format']}** "
            f"({_num(summary['best_raw_images_per_s'])} img/s; {_leads(summary)}); best served "
            f"**{summary['best_served_format']}** at "
            f"{summary['best_served_vs_best_raw']:.0%} of that bound"
        )
        notes = []
        if model == TARGET_MODEL:
            notes.append(f"target >= {TARGET_RATIO:.0%}: {'met' if summary['meets_target'] else 'NOT met'}")
        if summary.get("peers_measured"):
            above = "above" if summary["above_every_measured_peer"] else "NOT above"
            note = f"{above} every measured peer ({', '.join(summary['peers_measured'])})"
            if "best_peer" in summary:
                note += (
                    f"; the fastest, {summary['best_peer']}, "
                    f"{_num(summary['best_peer_images_per_s'])} img/s: "
                    f"ours {summary['ours_vs_best_peer']:.2f}x"
                )
            notes.append(note)
        elif model == TARGET_MODEL:
            notes.append("no peer measured")
        sentences.append(sentence + (f" ({'; '.join(notes)})" if notes else "") + ".")
    return sentences


def _leads(summary: dict[str, Any]) -> str:
    leads = summary.get("raw_lead_over")
    if leads is None:  # a run saved before the per-format leads
        return f"{summary['raw_lead_over_slowest']:.2f}x {summary['slowest_raw_format']}"
    return ", ".join(f"{lead:.2f}x {fmt}" for fmt, lead in leads.items()) or "the only format measured"


def _windows(result: dict[str, Any]) -> str:
    """The load windows: --seconds, or per model the range --min-batches stretched them to."""
    meta_ = result["meta"]
    spans = []
    for model, entry in result["models"].items():
        windows = [row["window_s"] for row in entry["formats"].values() if "window_s" in row]
        if windows and max(windows) > meta_["seconds"]:
            low, high = min(windows), max(windows)
            spans.append(f"{model} {_num(low)}" + (f"-{_num(high)}" if high > low else ""))
    text = f"{meta_['seconds']} s per load window"
    if spans:
        text += f" (stretched to hold {meta_.get('min_batches')} full batches: {', '.join(spans)} s)"
    return text


def _reps(result: dict[str, Any]) -> str:
    counts = {model: entry.get("reps", result["meta"]["reps"]) for model, entry in result["models"].items()}
    if len(set(counts.values())) <= 1:
        return f"{result['meta']['reps']} rep(s) (median)"
    return "reps (median): " + ", ".join(f"{model} {n}" for model, n in counts.items())


def section(result: dict[str, Any]) -> str:
    meta_ = result["meta"]
    return (
        f"{BEGIN}\n## One network in every format: bare runtime vs our server vs peers\n\n"
        f"`{meta_['command']}`: {meta_['machine']}; device {meta_['device']}, "
        f"precision {meta_['precision']}, "
        f"channels_last {meta_['channels_last']}; torch threads {meta_['torch_threads']} (bare runtime, "
        f"server and peers alike), decode threads {meta_['decode_threads']}, max batch "
        f"{meta_['max_batch_size']} (every server), {meta_['concurrency']} closed-loop callers, "
        f"{_windows(result)}, {meta_['raw_seconds']} s per raw batch size, "
        f"{_reps(result)}; load average {meta_['load_average_1m']} at the start"
        + (f", {meta_['load_average_1m_end']} at the end" if "load_average_1m_end" in meta_ else "")
        + ". Raw numbers: model_formats.json.\n\n"
        + "\n".join(f"- {sentence}" for sentence in verdicts(result))
        + "\n\n"
        + markdown_table(result)
        + "".join(f"\n\n- {note}" if i == 0 else f"\n- {note}" for i, note in enumerate(peer_notes(result)))
        + (
            "\n\nA peer's half-load row is at our half-load rate (the same offered load as ours): a peer "
            "whose capacity is below that rate queues, and its p99 says so."
            if peer_notes(result)
            else ""
        )
        + f"\n{END}"
    )


def write_section(text: str, block: str) -> str:
    """`text` with the marked block replaced by `block` (appended when there is none)."""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        return head + block + rest.split(END, 1)[1]
    return text.rstrip("\n") + "\n\n" + block + "\n"


def plot(result: dict[str, Any], path: Path) -> str:
    """Bars per model and format (raw bound, ours) and peers; the note says what was written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no plot (matplotlib is not installed: pip install matplotlib)"
    models = [m for m, e in result["models"].items() if e.get("summary", {}).get("measured")]
    figure, axes = plt.subplots(1, max(1, len(models)), figsize=(5 * max(1, len(models)), 4), squeeze=False)
    for axis, model in zip(axes[0], models, strict=False):
        entry = result["models"][model]
        names, raws, served = [], [], []
        for fmt, row in entry["formats"].items():
            if "raw" in row and "ours" in row:
                names.append(f"ours\n{fmt}")
                raws.append(row["raw"]["images_per_s"])
                served.append(row["ours"]["capacity"])
        for peer, values in entry.get("peers", {}).items():
            if "capacity" in values:
                names.append(f"{peer}\n{values.get('format', '')}")
                raws.append(0.0)
                served.append(values["capacity"])
        positions = range(len(names))
        axis.bar([p - 0.2 for p in positions], raws, width=0.4, label="bare runtime (bound)")
        axis.bar([p + 0.2 for p in positions], served, width=0.4, label="served (capacity)")
        axis.set_xticks(list(positions), names, fontsize=8)
        axis.set_title(f"{model} ({entry['input']})")
        axis.set_ylabel("images / s")
        axis.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return f"plot: {path.name}"


def write_results(result: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    result["meta"]["plot"] = plot(result, out / "model_formats.png")
    (out / "model_formats.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "model_formats.partial.json").unlink(missing_ok=True)
    page = out / "model_formats.md"
    text = page.read_text() if page.exists() else "# One network in every format\n"
    page.write_text(write_section(text, section(result)))


def parse_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def meta(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "command": args.command_line,
        "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} CPUs visible, "
        f"Python {platform.python_version()}",
        "device": args.device,
        "precision": args.precision,
        "channels_last": args.channels_last,
        "torch_threads": args.torch_threads,
        "decode_threads": args.decode_threads,
        "max_batch_size": args.max_batch_size,
        "concurrency": args.concurrency,
        "seconds": args.seconds,
        "raw_seconds": args.raw_seconds,
        "reps": args.reps,
        "reps_models": args.reps_models,
        "min_batches": args.min_batches,
        "batch_sizes": args.batch_sizes,
        "load_generator": args.load_generator,
        "load_average_1m": round(os.getloadavg()[0], 1),
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="benchmarks/model_formats.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--models", default=DEFAULT_MODELS, help="torchvision names and/or worksheet-topics")
    parser.add_argument("--formats", default=DEFAULT_FORMATS, help=f"among {', '.join(FORMATS)}")
    parser.add_argument("--size", type=int, default=224, help="input size of the torchvision models")
    parser.add_argument("--seconds", type=float, default=5.0, help="per load window (closed, half)")
    parser.add_argument("--raw-seconds", type=float, default=2.0, help="per batch size of the bare runtime")
    parser.add_argument("--warmup", type=float, default=2.0, help="the load generator's warm-up")
    parser.add_argument("--reps", type=int, default=1, help="repeat each measurement; report medians")
    parser.add_argument("--reps-models", default="", help="the models --reps applies to (default: all)")
    parser.add_argument(
        "--min-batches",
        type=int,
        default=30,
        help="stretch a format's load windows (up to 3x --seconds) to hold this many full batches "
        "at its bare rate; 0: --seconds exactly",
    )
    parser.add_argument("--batch-sizes", default="1,8,16", help="the bare runtime's batch sizes")
    parser.add_argument("--max-batch-size", type=int, default=16, help="our server's batcher")
    parser.add_argument("--max-queue-delay-ms", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=32, help="closed-loop callers")
    parser.add_argument("--connections", type=int, default=16)
    # One intra-op thread by default, as vision_bench: on a shared machine every OpenMP barrier
    # waits for a descheduled thread (DECISIONS D13).
    parser.add_argument("--torch-threads", type=int, default=1, help="bare runtime and server alike")
    parser.add_argument("--decode-threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp32")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--peers", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--peer-models", default=TARGET_MODEL, help="the models the peers serve too")
    parser.add_argument(
        "--peer-format",
        default="best",
        choices=("best", *FORMATS),
        help="the version the peers serve (best: this run's fastest bare runtime of that model)",
    )
    parser.add_argument("--install-peers", action="store_true", help="pip install the peers first")
    parser.add_argument(
        "--models-add", action="store_true", help="add versions with `snaplearn-vision models add`"
    )
    parser.add_argument("--load-generator", choices=("python", "go"), default="python")
    parser.add_argument(
        "--model-repository", type=Path, default=MODELS_DIR, help="where the default model is"
    )
    parser.add_argument("--out", type=Path, default=DOCS, help="where the JSON, plot and page go")
    parser.add_argument(
        "--export-dir", type=Path, default=None, help="keep (and reuse) the exported files here"
    )
    parser.add_argument(
        "--quick", action="store_true", help="MobileNetV3-small 64x64, 1 s windows: a smoke run"
    )
    parser.add_argument("--no-write", action="store_true", help="print only; leave --out alone")
    parser.add_argument("--from-json", type=Path, default=None, help="no run: page and plot from this JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.command_line = ("python benchmarks/model_formats.py " + " ".join(argv)).strip()
    if args.quick:
        args.models, args.size, args.seconds, args.raw_seconds, args.warmup = (
            "mobilenet_v3_small",
            64,
            1.0,
            0.5,
            0.5,
        )
        args.batch_sizes, args.concurrency, args.max_batch_size = "1,8", 8, 8
        if args.peer_models == TARGET_MODEL:  # the default: the peers serve the smoke model instead
            args.peer_models = args.models
    if args.from_json is not None:  # re-render a saved run (e.g. once matplotlib is installed)
        result = summarize(json.loads(args.from_json.read_text()))
    else:
        from snaplearn_bench.load import load_generator

        with load_generator(args.load_generator):
            result = run(args)
    print(markdown_table(result))
    print("\n".join(verdicts(result)))
    if not args.no_write:
        write_results(result, args.out)
        log(f"wrote {args.out / 'model_formats.md'}, model_formats.json ({result['meta'].get('plot')})")
    failed = any("failed" in row for entry in result["models"].values() for row in entry["formats"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
