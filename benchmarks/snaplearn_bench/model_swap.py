"""A hot swap under load: a closed loop of Classify while version 2 is added and version 1 removed.

    python benchmarks/model_swap.py                          # ResNet-50 224x224, TorchScript, CPU
    python benchmarks/model_swap.py --architecture mobilenet_v3_small --clients 8
    python benchmarks/model_swap.py --quick                  # SnapNet 64x64: a smoke run

Version 1 is added with `snaplearn-vision models add` before the server starts; the server
(`python -m snaplearn_vision.main`, its own process, polling the repository) serves it to
`--clients` closed-loop callers; after `--steady` seconds version 2 is added with the same
command while the calls go on (with `--server`, so the server loads it at once instead of at
its next poll; `--poll-only` leaves it to the poll), and once version 2 answers, version 1 is
removed with `models remove`. Reported: calls that failed (any status but OK), the time from starting
`models add` to the first answer from version 2 (and how much of it was the command itself),
the first version-2 call's latency against version 2's steady state (median), and the
server's own load-and-warm-up time (snaplearn_vision_model_load_seconds). Writes
docs/benchmarks/models_swap.json and the section of docs/benchmarks/models.md between its markers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from snaplearn_bench.paths import PY, REPO, log
from snaplearn_bench.processes import ready_file_process

NAME = "swapped"
RESULTS_JSON = REPO / "docs" / "benchmarks" / "models_swap.json"
RESULTS_MD = REPO / "docs" / "benchmarks" / "models.md"
BEGIN, END = "<!-- model_swap: begin -->", "<!-- model_swap: end -->"

_EXPORT = """
import sys, torch, torchvision
from snaplearn_common.topics import DEFAULT_TOPICS
architecture, size, out, seed = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
torch.manual_seed(seed)
if architecture == "snapnet":
    from snaplearn_vision.runtime.architectures import build_model
    network, channels = build_model("snapnet", len(DEFAULT_TOPICS), 1), 1
else:
    network, channels = getattr(torchvision.models, architecture)(num_classes=len(DEFAULT_TOPICS)), 3
network.eval()
with torch.no_grad():
    traced = torch.jit.trace(network, torch.rand(2, channels, size, size))
traced.save(out)
open(out + ".labels", "w").write("\\n".join(DEFAULT_TOPICS) + "\\n")
print(channels)
"""


@dataclass
class Call:
    sent: float
    latency_s: float
    version: str
    code: str


@dataclass
class Loop:
    calls: list[Call] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)


def export(architecture: str, size: int, out: Path, seed: int) -> int:
    """A TorchScript file of `architecture` (random weights); returns its input channels."""
    done = subprocess.run(
        [PY, "-c", _EXPORT, architecture, str(size), str(out), str(seed)],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(done.stdout.strip().splitlines()[-1])


def models_command(root: Path, *args: str) -> float:
    """Run `snaplearn-vision models ...`; returns its wall time."""
    started = time.perf_counter()
    subprocess.run(
        [PY, "-m", "snaplearn_vision.main", "models", "--repository", str(root), *args], check=True
    )
    return time.perf_counter() - started


def import_seconds() -> float:
    """What a fresh `models` process spends importing before it does anything."""
    started = time.perf_counter()
    subprocess.run([PY, "-c", "import snaplearn_vision.main, snaplearn_vision.models"], check=True)
    return time.perf_counter() - started


def add_args(model: Path, channels: int, size: int, max_batch: int) -> list[str]:
    normalise = ["--mean", "0.5", "--std", "0.25"] if channels == 1 else []
    return [
        "add", NAME, "--file", str(model), "--labels", f"{model}.labels", "--format", "torchscript",
        "--input-size", str(size), str(size), "--channels", str(channels), *normalise,
        "--max-batch-size", str(max_batch),
    ]  # fmt: skip


def photo() -> bytes:
    from snaplearn_vision.worksheets import sample_image_bytes

    return sample_image_bytes("fractions", seed=0)


async def closed_loop(target: str, image: bytes, clients: int, loop: Loop) -> None:
    from grpc import aio

    from snaplearn.vision.v1 import vision_pb2, vision_pb2_grpc

    channel = aio.insecure_channel(target)
    stub = vision_pb2_grpc.VisionServiceStub(channel)
    request = vision_pb2.ClassifyRequest(user_id="bench", image=image)

    async def client() -> None:
        while not loop.stop.is_set():
            sent = time.perf_counter()
            try:
                reply = await stub.Classify(request, timeout=60)
                loop.calls.append(Call(sent, time.perf_counter() - sent, reply.model_version, "OK"))
            except aio.AioRpcError as error:
                loop.calls.append(Call(sent, time.perf_counter() - sent, "", error.code().name))

    try:
        await asyncio.gather(*(client() for _ in range(clients)))
    finally:
        await channel.close()


def server_load_seconds(metrics_port: int) -> list[float]:
    """snaplearn_vision_model_load_seconds's sum and count from the server's /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    values = {}
    for line in text.splitlines():
        if line.startswith("snaplearn_vision_model_load_seconds_sum") or line.startswith(
            "snaplearn_vision_model_load_seconds_count"
        ):
            values[line.split("{")[0]] = float(line.rsplit(" ", 1)[1])
    return [values.get("snaplearn_vision_model_load_seconds_sum", 0.0),
            values.get("snaplearn_vision_model_load_seconds_count", 0.0)]  # fmt: skip


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="model-swap-") as scratch_name:
        scratch = Path(scratch_name)
        root = scratch / "models"
        log(f"exporting {args.architecture} {args.size}x{args.size} to TorchScript (two seeds)")
        channels = export(args.architecture, args.size, scratch / "v1.pt", seed=1)
        export(args.architecture, args.size, scratch / "v2.pt", seed=2)
        models_command(root, *add_args(scratch / "v1.pt", channels, args.size, args.max_batch_size))
        ready = scratch / "ready.json"
        argv = [
            PY, "-m", "snaplearn_vision.main", "--port", "0", "--metrics-port", "0",
            "--model-repository", str(root), "--model-name", NAME, "--model-version", "",
            "--device", "cpu", "--no-publish", "--spool-dir", "", "--ready-file", str(ready),
            "--model-poll-interval", str(args.poll), "--decode-threads", "1",
        ]  # fmt: skip
        with ready_file_process("vision", argv, ready, scratch / "vision.log") as server:
            loop = Loop()
            target = server.target
            caller = asyncio.create_task(closed_loop(target, photo(), args.clients, loop))
            await asyncio.sleep(args.steady)
            log("adding version 2 while the calls go on")
            added_at = time.perf_counter()
            v2_args = add_args(scratch / "v2.pt", channels, args.size, args.max_batch_size)
            if not args.poll_only:
                v2_args += ["--server", target]
            add_s = await asyncio.to_thread(models_command, root, *v2_args)
            while not any(call.version == "2" for call in loop.calls):
                if caller.done():
                    raise RuntimeError("the closed loop stopped before version 2 answered")
                await asyncio.sleep(0.01)
            first_v2 = min((c for c in loop.calls if c.version == "2"), key=lambda c: c.sent + c.latency_s)
            answered_at = first_v2.sent + first_v2.latency_s
            remove_s = await asyncio.to_thread(models_command, root, "remove", NAME, "1")
            await asyncio.sleep(args.steady)
            loop.stop.set()
            await caller
            load_sum, load_count = server_load_seconds(int(server.info["metrics_port"]))
        result = summarise(
            args, loop.calls, added_at, answered_at, add_s, remove_s, first_v2, load_sum, load_count
        )
        result["import_s"] = round(import_seconds(), 2)
        return result


def summarise(
    args: argparse.Namespace,
    calls: list[Call],
    added_at: float,
    answered_at: float,
    add_s: float,
    remove_s: float,
    first_v2: Call,
    load_sum: float,
    load_count: float,
) -> dict[str, Any]:
    v1 = [c.latency_s for c in calls if c.version == "1" and c.sent < added_at]
    v2 = sorted((c for c in calls if c.version == "2"), key=lambda c: c.sent)
    v2_steady = [c.latency_s for c in v2[len(v2) // 2 :]]  # the later half: well after the swap
    first_ten = [c.latency_s for c in v2[:10]]
    return {
        "architecture": args.architecture,
        "input": f"{args.size}x{args.size}",
        "format": "torchscript",
        "picked_up_by": "the poll" if args.poll_only else "models add --server (RepositoryModelLoad)",
        "poll_interval_s": args.poll,
        "clients": args.clients,
        "max_batch_size": args.max_batch_size,
        "calls": len(calls),
        "failed_calls": sum(1 for c in calls if c.code != "OK"),
        "failed_codes": sorted({c.code for c in calls if c.code != "OK"}),
        "add_to_first_v2_s": round(answered_at - added_at, 2),
        "models_add_command_s": round(add_s, 2),
        "models_remove_command_s": round(remove_s, 2),
        "server_load_and_warm_up_mean_s": round(load_sum / load_count, 2) if load_count else None,
        "server_loads": int(load_count),
        "v1_steady_p50_ms": round(1000 * statistics.median(v1), 1) if v1 else None,
        "v2_first_call_ms": round(1000 * first_v2.latency_s, 1),
        "v2_first_10_p50_ms": round(1000 * statistics.median(first_ten), 1),
        "v2_steady_p50_ms": round(1000 * statistics.median(v2_steady), 1),
        "v2_first_call_vs_steady": round(first_v2.latency_s / statistics.median(v2_steady), 2),
        "v1_answers_after_remove": sum(1 for c in calls if c.version == "1" and c.sent > answered_at + 1.0),
        "load_average_1m": round(os.getloadavg()[0], 1),  # the machine's other work skews everything
        "cpu_cores": os.cpu_count(),
    }


def write_results(result: dict[str, Any], command: str) -> None:
    RESULTS_JSON.write_text(json.dumps(result, indent=2) + "\n")
    rows = "\n".join(f"| {key} | {value} |" for key, value in result.items())
    section = (
        f"{BEGIN}\n## A hot swap under load\n\n`{command}`, one run on CPU (load average while it ran: "
        f"{result['load_average_1m']} on {result['cpu_cores']} cores; raw numbers in models_swap.json). "
        "`add_to_first_v2_s` counts from starting `models add` to the first answer from version 2. "
        "The command (`models_add_command_s`) loads the version in its own process and runs test "
        "batches of 1 and 2 before it becomes visible; with `--server` it also waits while the server "
        "loads and warms it (`server_load_and_warm_up_mean_s`) and swaps it in. `import_s`: a fresh process "
        f"importing the command's modules.\n\n| measure | value |\n|---|---|\n{rows}\n{END}"
    )
    text = RESULTS_MD.read_text() if RESULTS_MD.exists() else "# Models: formats and live swaps\n\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    RESULTS_MD.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--architecture", default="resnet50", help="a torchvision classifier, or snapnet")
    parser.add_argument("--size", type=int, default=224, help="input height = width")
    parser.add_argument("--clients", type=int, default=4, help="closed-loop callers")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument(
        "--steady", type=float, default=15.0, help="seconds before the add and after the swap"
    )
    parser.add_argument("--poll", type=float, default=0.5, help="the server's --model-poll-interval")
    parser.add_argument(
        "--poll-only", action="store_true", help="add version 2 without --server: the poll picks it up"
    )
    parser.add_argument("--quick", action="store_true", help="SnapNet 64x64, short: a smoke run")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks alone")
    args = parser.parse_args(argv)
    if args.quick:
        args.architecture, args.size, args.steady = "snapnet", 64, 3.0
    result = asyncio.run(run(args))
    print(json.dumps(result))
    if not args.no_write:
        command = "python benchmarks/model_swap.py " + " ".join(argv if argv is not None else sys.argv[1:])
        write_results(result, command.strip())
    return 0 if result["failed_calls"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
