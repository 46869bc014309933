"""One network in every format: the raw bound of each against our server serving it.

    python benchmarks/model_formats.py                      # ResNet-50 224x224, random weights, CPU
    python benchmarks/model_formats.py --formats onnx,torchscript --seconds 10
    python benchmarks/model_formats.py --quick              # MobileNetV3-small 64x64: a smoke run

The network (a torchvision architecture, seeded random weights: serving cost does not depend on
the weights) is exported in a process of its own to a state_dict, TorchScript (torch.jit.trace),
an ExportedProgram (torch.export, dynamic batch) and ONNX (dynamic batch), and each file is
added to a scratch repository with `snaplearn-vision models add` (the command a user runs).
Then, per format, one after the other on the same machine:

- raw bound: `snaplearn_bench.raw`: decode + forward back to back through the server's own engine
  (ImageClassifier), no server, no network, at each --batch-sizes; the best is the bound;
- ours: `python -m snaplearn_vision.main` serving that version, under a closed loop of Classify
  calls (`snaplearn_bench.pyloadgen`, --concurrency callers): answers per second, p50/p99.

Writes docs/benchmarks/model_formats.json and the section of docs/benchmarks/models.md between
its markers (the hot-swap benchmark, benchmarks/model_swap.py, writes its own section there).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from snaplearn_bench.paths import DOCS, PY, log
from snaplearn_bench.processes import ready_file_process, torch_env

FORMATS = ("state_dict", "torchscript", "torch_export", "onnx")
RESULTS_JSON = DOCS / "model_formats.json"
RESULTS_MD = DOCS / "models.md"
BEGIN, END = "<!-- model_formats: begin -->", "<!-- model_formats: end -->"

_EXPORT = """
import json, sys, warnings
import torch, torchvision
from snaplearn_common.topics import DEFAULT_TOPICS
architecture, size, out, formats = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4].split(",")
torch.manual_seed(0)
network = torchvision.models.get_model(architecture, weights=None, num_classes=len(DEFAULT_TOPICS)).eval()
example = torch.rand(2, 3, size, size)
files, seconds = {}, {}
warnings.simplefilter("ignore")
import time
for fmt in formats:
    started = time.perf_counter()
    if fmt == "state_dict":
        path = f"{out}/{architecture}.state_dict.pt"
        torch.save(network.state_dict(), path)
    elif fmt == "torchscript":
        path = f"{out}/{architecture}.ts.pt"
        with torch.no_grad():
            torch.jit.trace(network, example).save(path)
    elif fmt == "torch_export":
        path = f"{out}/{architecture}.pt2"
        batch = torch.export.Dim("batch", min=1, max=4096)
        torch.export.save(torch.export.export(network, (example,), dynamic_shapes={"x": {0: batch}}), path)
    elif fmt == "onnx":
        path = f"{out}/{architecture}.onnx"
        torch.onnx.export(network, (example,), path, input_names=["pixels"], output_names=["logits"],
                          dynamic_axes={"pixels": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    else:
        raise SystemExit(f"unknown format {fmt}")
    files[fmt] = path
    seconds[fmt] = time.perf_counter() - started
open(f"{out}/labels.txt", "w").write("\\n".join(DEFAULT_TOPICS) + "\\n")
print(json.dumps({"files": files, "export_s": seconds}))
"""


def export(architecture: str, size: int, out: Path, formats: list[str]) -> dict[str, Any]:
    done = subprocess.run(
        [PY, "-c", _EXPORT, architecture, str(size), str(out), ",".join(formats)],
        check=True,
        capture_output=True,
        text=True,
    )
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def add(root: Path, name: str, file: str, fmt: str, args: argparse.Namespace, labels: Path) -> float:
    """`snaplearn-vision models add`; returns its wall time (copy, load, checks, warm-up)."""
    command = [
        PY, "-m", "snaplearn_vision.main", "models", "--repository", str(root), "add", name,
        "--file", file, "--labels", str(labels), "--format", fmt,
        "--input-size", str(args.size), str(args.size), "--channels", "3",
        "--max-batch-size", str(args.max_batch_size),
    ]  # fmt: skip
    if fmt == "state_dict":
        command += ["--architecture", args.architecture]
    started = time.perf_counter()
    subprocess.run(command, check=True, env=torch_env(args.torch_threads), capture_output=True)
    return time.perf_counter() - started


def raw_bound(root: Path, name: str, args: argparse.Namespace) -> dict[str, Any]:
    command = [
        PY, "-m", "snaplearn_bench.raw", "--repository", str(root), "--model", name,
        "--batch-sizes", args.batch_sizes, "--seconds", str(args.seconds),
        "--torch-threads", str(args.torch_threads), "--decode-threads", str(args.decode_threads),
    ]  # fmt: skip
    done = subprocess.run(
        command, check=True, env=torch_env(args.torch_threads), capture_output=True, text=True
    )
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def ours(root: Path, name: str, scratch: Path, args: argparse.Namespace) -> dict[str, Any]:
    ready = scratch / f"ready-{name}.json"
    argv = [
        PY, "-m", "snaplearn_vision.main", "--port", "0", "--metrics-port", "0",
        "--model-repository", str(root), "--model-name", name, "--model-version", "",
        "--device", "cpu", "--no-publish", "--spool-dir", "", "--ready-file", str(ready),
        "--torch-threads", str(args.torch_threads), "--decode-threads", str(args.decode_threads),
        "--max-batch-size", str(args.max_batch_size),
    ]  # fmt: skip
    env = torch_env(args.torch_threads)
    with ready_file_process(f"vision-{name}", argv, ready, scratch / f"vision-{name}.log", env=env) as server:
        command = [
            PY, "-m", "snaplearn_bench.pyloadgen", "--target", server.target,
            "--seconds", str(args.seconds), "--warmup", str(args.warmup), "--timeout", "60",
            "closed", "--concurrency", str(args.concurrency),
        ]  # fmt: skip
        done = subprocess.run(command, check=True, env=env, capture_output=True, text=True)
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def run(args: argparse.Namespace) -> dict[str, Any]:
    formats = [fmt for fmt in args.formats.split(",") if fmt]
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise SystemExit(f"unknown formats {unknown}; known: {', '.join(FORMATS)}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="model-formats-") as scratch_name:
        scratch = Path(scratch_name)
        log(f"exporting {args.architecture} {args.size}x{args.size} to {', '.join(formats)}")
        exported = export(args.architecture, args.size, scratch, formats)
        root = scratch / "models"
        for fmt in formats:
            name = f"{args.architecture}-{fmt}".replace("_", "-")
            log(f"{fmt}: models add")
            add_s = add(root, name, exported["files"][fmt], fmt, args, scratch / "labels.txt")
            log(f"{fmt}: raw bound")
            raw = raw_bound(root, name, args)
            log(f"{fmt}: our server")
            served = ours(root, name, scratch, args)
            rows.append(
                {
                    "format": fmt,
                    "export_s": round(exported["export_s"][fmt], 2),
                    "models_add_s": round(add_s, 2),
                    "raw_images_per_s": round(raw["images_per_s"], 2),
                    "raw_best_batch_size": raw["best_batch_size"],
                    "raw_by_batch_size": {k: round(v, 2) for k, v in raw["by_batch_size"].items()},
                    "ours_images_per_s": round(served["throughput"], 2),
                    "ours_p50_ms": round(served["p50_ms"], 1),
                    "ours_p99_ms": round(served["p99_ms"], 1),
                    "ours_mean_batch": round(served["mean_batch_size_seen"], 2),
                    "ours_errors": served["errors"],
                    "ours_vs_own_raw": round(served["throughput"] / raw["images_per_s"], 3),
                }
            )
    best_raw = max(rows, key=lambda row: row["raw_images_per_s"])
    for row in rows:
        row["ours_vs_best_raw"] = round(row["ours_images_per_s"] / best_raw["raw_images_per_s"], 3)
    fastest = max(rows, key=lambda row: row["ours_images_per_s"])
    slowest = min(rows, key=lambda row: row["ours_images_per_s"])
    return {
        "architecture": args.architecture,
        "input": f"3x{args.size}x{args.size}",
        "device": "cpu",
        "machine": f"{platform.machine()}, {_cpus()} CPUs visible",
        "torch_threads": args.torch_threads,
        "decode_threads": args.decode_threads,
        "max_batch_size": args.max_batch_size,
        "concurrency": args.concurrency,
        "seconds": args.seconds,
        "best_raw_format": best_raw["format"],
        "fastest_served_format": fastest["format"],
        "fastest_vs_slowest_served": round(
            fastest["ours_images_per_s"] / max(slowest["ours_images_per_s"], 1e-9), 2
        ),
        "rows": rows,
    }


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0))


def write_results(result: dict[str, Any], command: str) -> None:
    RESULTS_JSON.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_JSON.write_text(json.dumps(result, indent=2) + "\n")
    table = [
        "| format | raw bound img/s (batch) | ours img/s | ours / own raw | ours / best raw "
        "| p50 ms | p99 ms | mean batch | errors | `models add` s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        errors = ", ".join(f"{code} {n}" for code, n in row["ours_errors"].items()) or "0"
        table.append(
            f"| {row['format']} | {row['raw_images_per_s']} ({row['raw_best_batch_size']}) "
            f"| {row['ours_images_per_s']} | {row['ours_vs_own_raw']:.0%} | {row['ours_vs_best_raw']:.0%} "
            f"| {row['ours_p50_ms']} | {row['ours_p99_ms']} | {row['ours_mean_batch']} | {errors} "
            f"| {row['models_add_s']} |"
        )
    section = (
        f"{BEGIN}\n## One network in every format ({result['architecture']}, {result['input']}, CPU)\n\n"
        f"`{command}`: one run; {result['machine']}, torch threads {result['torch_threads']}, decode "
        f"threads {result['decode_threads']}, max batch {result['max_batch_size']}, "
        f"{result['concurrency']} closed-loop callers, {result['seconds']} s per measurement "
        f"(raw numbers in model_formats.json). Served fastest: **{result['fastest_served_format']}** "
        f"({result['fastest_vs_slowest_served']}x the slowest); best raw bound: "
        f"{result['best_raw_format']}.\n\n" + "\n".join(table) + f"\n{END}"
    )
    text = RESULTS_MD.read_text() if RESULTS_MD.exists() else "# Models: formats and live swaps\n\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    RESULTS_MD.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--architecture", default="resnet50", help="a torchvision classifier")
    parser.add_argument("--size", type=int, default=224, help="input height = width")
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--batch-sizes", default="1,8,16", help="the raw bound's batch sizes")
    parser.add_argument("--max-batch-size", type=int, default=16, help="the server's batcher")
    parser.add_argument("--concurrency", type=int, default=16, help="closed-loop callers")
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    parser.add_argument("--warmup", type=float, default=2.0, help="the load generator's warm-up")
    parser.add_argument("--torch-threads", type=int, default=2)
    parser.add_argument("--decode-threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="MobileNetV3-small 64x64, short: a smoke run")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks alone")
    args = parser.parse_args(argv)
    if args.quick:
        args.architecture, args.size, args.seconds, args.warmup = "mobilenet_v3_small", 64, 1.0, 0.5
        args.batch_sizes, args.concurrency, args.max_batch_size = "1,8", 8, 8
    result = run(args)
    print(json.dumps(result))
    if not args.no_write:
        command = "python benchmarks/model_formats.py " + " ".join(argv if argv is not None else [])
        write_results(result, command.strip())
    return 0 if all(not row["ours_errors"] for row in result["rows"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
