"""Build the repository's Go commands for tests, as the benchmarks do.

Each command is its own Go module (they share the API stubs module protos/go through a `replace`).
Skips, naming the reason, where the Go toolchain is not on PATH.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# command name -> (module folder, package path inside it)
GO_COMMANDS = {
    "snaplearn-gateway": (REPO / "services" / "gateway", "."),
    "snaplearn-loadgen": (REPO / "benchmarks" / "loadgen", "."),
    "snaplearn-example": (REPO / "clients" / "go", "./cmd/snaplearn-example"),
}
BUILD_TIMEOUT_S = 600  # a cold machine fetches the Go modules first


def go_or_skip(needed_for: str) -> str:
    go = shutil.which("go")
    if go is None:
        pytest.skip(f"the Go toolchain is not on PATH: {needed_for}")
    return go


def build_go_command(name: str, out_dir: Path) -> Path:
    """`go build` the named command into out_dir; fails the test (with go's output) if it does not build."""
    module, package = GO_COMMANDS[name]
    binary = out_dir / name
    built = subprocess.run(
        [go_or_skip(f"{name} cannot be built"), "build", "-o", str(binary), package],
        cwd=module,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
    )
    assert built.returncode == 0, f"go build {name} ({module}) failed:\n{built.stdout}\n{built.stderr}"
    return binary
