"""The whole system as `make up` starts it, for end-to-end tests: separate processes, real gRPC.

    with embedded_system(tmp_path / "var", trained_model_repository) as system:
        VisionClient(system.vision_target) ...

The vision server and the recommender run via snaplearn_common.launcher (ports 0, reported in
their ready files) on the embedded bus, with a copy of the given model repository. Leaving the
block stops both (SIGTERM, so they drain); when the block ended without an error, it also checks
that each exited 0, since a server that crashes on shutdown would otherwise go unnoticed.

`launch_settings` is the same launch with another bus (tests/helpers/kafka_system.py).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from snaplearn_common.eventbus.settings import BusSettings
from snaplearn_common.launcher import LaunchSettings, server_processes

READY_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class RunningSystem:
    vision: dict[str, int]  # the vision server's ready file: port, metrics_port
    recommender: dict[str, int]  # the recommender's ready file

    @property
    def vision_target(self) -> str:
        return f"127.0.0.1:{self.vision['port']}"

    @property
    def recommender_target(self) -> str:
        return f"127.0.0.1:{self.recommender['port']}"


def launch_settings(data_dir: Path, bus: BusSettings) -> LaunchSettings:
    """What `make up` would use in data_dir, but every port 0 (tests run side by side)."""
    return LaunchSettings.from_env(
        {},
        data_dir=data_dir,
        vision_port=0,
        vision_metrics_port=0,
        recommender_port=0,
        recommender_metrics_port=0,
        bus=bus,
    )


@contextmanager
def embedded_system(data_dir: Path, models: Path) -> Iterator[RunningSystem]:
    """Both servers started in data_dir (which must not exist yet) and ready."""
    shutil.copytree(models, data_dir / "models")
    bus = BusSettings.from_env({}, backend="embedded", embedded_path=str(data_dir / "bus.db"))
    processes = server_processes(launch_settings(data_dir, bus))
    try:
        for process in processes:
            process.start()
        vision, recommender = (process.wait_ready(READY_TIMEOUT_S) for process in processes)
        yield RunningSystem(vision, recommender)
    finally:
        for process in processes:
            process.stop()
    for process in processes:
        assert process.process is not None
        assert process.process.returncode == 0, f"{process.name} did not stop cleanly:\n{process.log_tail()}"
