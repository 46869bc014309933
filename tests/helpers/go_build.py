"""Build the repository's Go commands (clients/go/cmd/<name>) for tests, as the benchmarks do.

Skips, naming the reason, where the Go toolchain is not on PATH.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

GO_MODULE = Path(__file__).resolve().parents[2] / "clients" / "go"
BUILD_TIMEOUT_S = 600  # a cold machine fetches the Go modules first


def go_or_skip(needed_for: str) -> str:
    go = shutil.which("go")
    if go is None:
        pytest.skip(f"the Go toolchain is not on PATH: {needed_for}")
    return go


def build_go_command(name: str, out_dir: Path) -> Path:
    """`go build ./cmd/<name>` into out_dir; fails the test (with go's output) if it does not build."""
    binary = out_dir / name
    built = subprocess.run(
        [go_or_skip(f"{name} cannot be built"), "build", "-o", str(binary), f"./cmd/{name}"],
        cwd=GO_MODULE,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
    )
    assert built.returncode == 0, f"go build ./cmd/{name} failed:\n{built.stdout}\n{built.stderr}"
    return binary
