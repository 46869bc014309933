"""Where a checkout keeps what the benchmarks prepare and write, and the harness's log line."""

from __future__ import annotations

import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BENCH_DIR = REPO / "benchmarks"  # on PYTHONPATH of the processes the harness starts
DOCS = REPO / "docs" / "benchmarks"  # the result pages
MODELS_DIR = REPO / "var" / "models"  # the default model, as `make up` trains it
BENCH_MODELS_DIR = REPO / "var" / "bench-models"  # torchvision architectures, random weights
TOOLS_DIR = REPO / "var" / "bench-tools"  # perf_analyzer, the Triton venv
RUNS_DIR = REPO / "var" / "bench-runs"  # per-run scratch: photos for the Go generator, A/B checkouts
PY = sys.executable


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
