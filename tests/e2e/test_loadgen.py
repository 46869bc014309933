"""The vision benchmark's load generators against a real vision server: their JSON is right.

benchmarks/loadgen (snaplearn-loadgen) is built with `go build` (as benchmarks/vision_bench.py does)
and run as a separate process against our server (gRPC on port 0, the small trained model),
once in a closed loop and once in an open loop against a held model and a queue of 2, where
every request past the queue must come back RESOURCE_EXHAUSTED and be counted as a refusal.
Its Open Inference Protocol mode (how the benchmark drives NVIDIA Triton) and the Python
generator's (snaplearn_bench.pyloadgen) run against our server's OIP endpoint.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest

from snaplearn_vision.worksheets import sample_image_bytes
from tests.helpers.go_build import BUILD_TIMEOUT_S, build_go_command
from tests.helpers.vision_model import trained_model_repository  # noqa: F401  (fixture)
from tests.helpers.vision_server import (  # noqa: F401  (server_factory: the fixture)
    MODEL_NAME,
    ServerFactory,
    read_events,
    server_factory,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(BUILD_TIMEOUT_S + 120)]


@pytest.fixture(scope="module")
def loadgen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_go_command("snaplearn-loadgen", tmp_path_factory.mktemp("loadgen"))


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    for index, topic in enumerate(("fractions", "addition", "geometry", "exponents")):
        (folder / f"{index:03d}.jpg").write_bytes(sample_image_bytes(topic, seed=index))
    return folder


PYTHON_LOADGEN = (sys.executable, "-m", "snaplearn_bench.pyloadgen")


async def run_loadgen(binary: Path | None, photos: Path | None, target: str, *mode: str) -> dict[str, Any]:
    """Run a generator: the Go binary (with --photos), or the Python one when `binary` is None
    (photos None too: it renders its own)."""
    command = [str(binary)] if binary is not None else list(PYTHON_LOADGEN)
    # A subprocess the event loop awaits: the server under test runs on this very loop.
    process = await asyncio.create_subprocess_exec(
        *command,
        "--target",
        target,
        *(["--photos", str(photos)] if photos is not None else []),
        "--seconds",
        "1",
        "--warmup",
        "0.5",
        "--timeout",
        "3",
        *mode,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, stderr.decode()
    return dict(json.loads(stdout.decode().strip().splitlines()[-1]))


async def test_closed_loop_reports_every_answer_and_our_batch_sizes(
    server_factory: ServerFactory,  # noqa: F811  (the fixture)
    loadgen: Path,
    photos: Path,
) -> None:
    running = await server_factory.start()
    result = await run_loadgen(loadgen, photos, running.server.target, "closed", "--concurrency", "8")
    assert result["mode"] == "closed" and result["concurrency"] == 8 and result["rate"] == 0.0
    assert result["sent"] > 0 and result["ok"] == result["sent"] and result["errors"] == {}
    assert result["throughput"] == pytest.approx(result["ok"] / result["seconds"])
    assert 0 < result["p50_ms"] <= result["p95_ms"] <= result["p99_ms"]
    assert 1 <= result["mean_batch_size_seen"] <= 8  # the factory's max batch size
    assert math.isnan(result["rejected_p99_ms"])  # nothing was refused
    assert result["generator_cpu_cores"] > 0


async def test_open_loop_counts_refusals_apart_with_their_latency(
    server_factory: ServerFactory,  # noqa: F811  (the fixture)
    loadgen: Path,
    photos: Path,
) -> None:
    running = await server_factory.start(max_queue_size=2, max_batch_size=1)
    await running.gates.hold_next_batch()  # the model holds its first batch: the queue fills
    result = await run_loadgen(loadgen, photos, running.server.target, "open", "--rate", "100")
    running.gates.open.set()
    assert result["mode"] == "open" and result["rate"] == 100.0 and result["concurrency"] == 0
    assert result["sent"] == pytest.approx(100, abs=5)  # a fixed schedule over the 1 s window
    refused = result["errors"].get("RESOURCE_EXHAUSTED", 0)
    assert refused >= result["sent"] - 4  # at most the queue (2) plus one batch got in
    assert result["ok"] + sum(result["errors"].values()) == result["sent"]
    assert 0 < result["rejected_p99_ms"] < 3000
    assert result["send_lag_p99_ms"] >= 0


@pytest.mark.parametrize("generator", ["go", "python"])
async def test_open_inference_protocol_mode_classifies_through_model_infer(
    server_factory: ServerFactory,  # noqa: F811  (the fixture)
    loadgen: Path,
    photos: Path,
    generator: str,
) -> None:
    running = await server_factory.start()
    binary, folder = (loadgen, photos) if generator == "go" else (None, None)
    oip = ("--protocol", "oip", "--model", MODEL_NAME)
    result = await run_loadgen(binary, folder, running.server.target, *oip, "closed", "--concurrency", "4")
    assert result["sent"] > 0 and result["ok"] == result["sent"] and result["errors"] == {}
    assert math.isnan(result["mean_batch_size_seen"])  # ModelInfer's answer does not say
    # Every photo went through the model (warm-up ones too), and as ModelInfer, not Classify:
    # a ModelInfer that names no user publishes no event, a Classify always does.
    assert running.batcher().stats.computed >= result["sent"]
    assert read_events(running.bus, expected=1, timeout_s=1.0) == []


async def test_open_inference_protocol_mode_counts_an_unknown_model_as_not_found(
    server_factory: ServerFactory,  # noqa: F811  (the fixture)
    loadgen: Path,
    photos: Path,
) -> None:
    running = await server_factory.start()
    oip = ("--protocol", "oip", "--model", "no-such-model")
    result = await run_loadgen(loadgen, photos, running.server.target, *oip, "closed", "--concurrency", "2")
    assert result["sent"] > 0 and result["ok"] == 0
    assert result["errors"] == {"NOT_FOUND": result["sent"]}
