"""The load generators, as the scenarios run them: one closed or open loop per `load()` call.

Two generators with the same command line and one-line JSON result (pyloadgen's LoadResult):
the Go one (benchmarks/loadgen, built with `go build` when a `load_generator("go")` block
opens) and the Python one (`python -m snaplearn_bench.pyloadgen`, for machines without Go).
Each runs as a process of its own, never inside the server it measures.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from snaplearn_bench.paths import BENCH_DIR, PY
from snaplearn_bench.processes import loadgen_binary, scratch_dir

LOAD_GENERATORS = ("go", "python")
PYTHON_GENERATOR = [PY, "-m", "snaplearn_bench.pyloadgen"]
# The generator's warm-up before each measured window (connections, first batches).
WARMUP_S = 3.0

# What load() runs before its shared arguments; load_generator() switches it.
_load_command: list[str] = list(PYTHON_GENERATOR)


def photos(count: int = 48) -> list[bytes]:
    """Real JPEG photos (about 10 KB, 320x240), a few per topic."""
    from snaplearn_common.topics import DEFAULT_TOPICS
    from snaplearn_vision.worksheets import sample_image_bytes

    return [sample_image_bytes(DEFAULT_TOPICS[i % len(DEFAULT_TOPICS)], seed=i) for i in range(count)]


def current_command() -> list[str]:
    """The command line load() starts a generator with, before its own arguments."""
    return list(_load_command)


@contextlib.contextmanager
def load_generator(name: str, nice: int = 0, cpus: frozenset[int] | None = None) -> Iterator[None]:
    """Make load() use generator `name` ("go" or "python") inside the block, at niceness `nice`
    (0: as this process; negative needs root). For "go": build the binary once and write
    photos() once, as 000.jpg..., into a scratch directory that the block's load() calls share.

    cpus: the generator runs alone on these CPUs (taskset) and this process, with everything
    it starts inside the block (servers, gateway, peers, the raw bound), on the others, as if
    the callers were on machines of their own; None: everyone shares every CPU."""
    global _load_command
    if name not in LOAD_GENERATORS:
        raise ValueError(f"load generator {name!r} is not one of {LOAD_GENERATORS}")
    with contextlib.ExitStack() as stack:
        command = list(PYTHON_GENERATOR)
        if name == "go":
            binary = loadgen_binary()
            folder = stack.enter_context(scratch_dir("photos-"))
            write_photos(folder)
            command = [str(binary), "--photos", str(folder)]
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
    """One closed loop of `concurrency` callers or one open loop at `rate` requests/s against
    `target` ("grpc": Classify, "http": LitServe's JSON, "oip": ModelInfer of `model`): the
    generator's result (throughput, percentiles, errors by status, its own send lag and CPU)."""
    argv = [
        *_load_command,
        "--target", target,
        "--protocol", protocol,
        "--seconds", str(seconds),
        "--warmup", str(warmup_s),
        "--timeout", str(timeout_s),
        "--connections", str(connections),
        *(["--model", model] if protocol == "oip" else []),
        mode,
    ]  # fmt: skip
    argv += ["--concurrency", str(concurrency)] if mode == "closed" else ["--rate", f"{rate:.2f}"]
    paths = [str(BENCH_DIR), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    out = subprocess.run(argv, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"load generator failed: {out.stderr[-2000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def write_photos(folder: Path, count: int = 48) -> None:
    """photos() as 000.jpg, 001.jpg, ... in `folder` (what the Go generator's --photos reads)."""
    for index, photo in enumerate(photos(count)):
        (folder / f"{index:03d}.jpg").write_bytes(photo)
