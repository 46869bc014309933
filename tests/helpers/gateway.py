"""Start the built snaplearn-gateway for a test and stop it afterwards (shared by the e2e tests)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol


class GatewayStarter(Protocol):
    def __call__(self, args: Sequence[str]) -> tuple[int, int]: ...


@contextmanager
def gateway_processes(binary: Path, folder: Path) -> Iterator[GatewayStarter]:
    """Yields start(args) -> (port, metrics port): a gateway on port 0 with `args` beside it, ready
    once it says so; at the end each is terminated and must exit 0 (a clean drain)."""
    started: list[subprocess.Popen[str]] = []

    def start(args: Sequence[str]) -> tuple[int, int]:
        ready_file = folder / f"gateway-{len(started)}.json"
        process = subprocess.Popen(
            [str(binary), "--port", "0", "--metrics-port", "0", "--ready-file", str(ready_file), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        started.append(process)
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("gateway ready on"), f"gateway exited with {process.poll()}: {line!r}"
        ready = json.loads(ready_file.read_text())
        return int(ready["port"]), int(ready["metrics_port"])

    try:
        yield start
    finally:
        for process in started:
            process.terminate()
            process.communicate(timeout=30)
            assert process.returncode == 0
