"""The vision server and the recommender as real processes on a real Kafka broker.

Each `KafkaSystem` gets its own topic (and so its own dead-letter topic) and consumer group,
so tests sharing the session broker never see each other's events. The processes are those
`make up` starts (snaplearn_common.launcher) with ports 0 (each reports its own in a ready
file); the model is the small trained test model.
"""

from __future__ import annotations

import shutil
import signal
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from snaplearn_client import RecommenderClient
from snaplearn_common.eventbus.base import Record
from snaplearn_common.eventbus.kafka import KafkaEventBus
from snaplearn_common.eventbus.settings import BusSettings
from snaplearn_common.launcher import ManagedProcess, server_processes
from tests.contract.eventbus_contract import POLL_S
from tests.helpers.kafka_broker import unique_name
from tests.helpers.system import READY_TIMEOUT_S, launch_settings

PARTITIONS = 4


@dataclass
class KafkaSystem:
    bootstrap: str
    data_dir: Path
    topic: str = field(default_factory=lambda: unique_name("e2e-classified"))
    group: str = field(default_factory=lambda: unique_name("e2e-recommender"))
    checkpoint_interval_s: float = 1.0
    session_timeout_s: float = 6.0  # the broker's minimum: a SIGKILLed member is evicted fast
    vision: ManagedProcess | None = None
    recommender: ManagedProcess | None = None
    vision_ports: dict[str, int] = field(default_factory=dict)
    recommender_ports: dict[str, int] = field(default_factory=dict)
    recommender_starts: int = 0
    recommender_args: list[str] = field(default_factory=list)  # more flags for the recommender

    @property
    def dead_letter_topic(self) -> str:
        return self.topic + ".dlq"

    def _bus(self) -> BusSettings:
        return BusSettings.from_env(
            {},
            backend="kafka",
            kafka_bootstrap_servers=self.bootstrap,
            topic=self.topic,
            partitions=PARTITIONS,
            session_timeout_s=self.session_timeout_s,
        )

    def _server_processes(self) -> tuple[ManagedProcess, ManagedProcess]:
        """The vision server and the recommender as `make up` runs them, on this system's topic."""
        vision, recommender = server_processes(launch_settings(self.data_dir, self._bus()))
        return vision, recommender

    def start_vision(self, models: Path) -> None:
        shutil.copytree(models, self.data_dir / "models", dirs_exist_ok=True)
        self.vision, _ = self._server_processes()
        self.vision.start()
        self.vision_ports = self.vision.wait_ready(READY_TIMEOUT_S)

    def start_recommender(self) -> None:
        self.recommender_starts += 1
        _, self.recommender = self._server_processes()
        # This system's own group (tests share the broker), checkpointing as often as the test says.
        self.recommender.argv += [
            "--checkpoint-interval", str(self.checkpoint_interval_s), "--consumer-group", self.group,
            *self.recommender_args,
        ]  # fmt: skip
        self.recommender.start()
        self.recommender_ports = self.recommender.wait_ready(READY_TIMEOUT_S)

    def kill_recommender(self) -> None:
        """SIGKILL: no drain, no final checkpoint, no leaving the group."""
        assert self.recommender is not None and self.recommender.process is not None
        self.recommender.process.send_signal(signal.SIGKILL)
        self.recommender.process.wait(30)

    def stop(self) -> list[tuple[str, int | None, str]]:
        """SIGTERM both; returns (name, exit code, log tail) of each."""
        results = []
        for process in (self.recommender, self.vision):
            if process is None:
                continue
            process.stop()
            code = process.process.returncode if process.process else None
            results.append((process.name, code, process.log_tail(40)))
        return results

    @property
    def vision_target(self) -> str:
        return f"127.0.0.1:{self.vision_ports['port']}"

    @property
    def recommender_target(self) -> str:
        return f"127.0.0.1:{self.recommender_ports['port']}"

    def vision_metric(self, name: str) -> float:
        """A sample of the vision server's /metrics, e.g. snaplearn_vision_events_dropped_total."""
        url = f"http://127.0.0.1:{self.vision_ports['metrics_port']}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            text = reply.read().decode()
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise AssertionError(f"{name} not in /metrics")

    def events_applied(self) -> int:
        with RecommenderClient(self.recommender_target) as client:
            return client.recommend("probe-user", k=1).events_applied

    def wait_applied(self, count: int, deadline_s: float = 90.0) -> int:
        """Poll Recommend until the model has applied `count` events (fails if it passes it)."""
        deadline = time.monotonic() + deadline_s
        applied = -1
        while time.monotonic() < deadline:
            applied = self.events_applied()
            if applied >= count:
                return applied
            time.sleep(0.1)
        raise AssertionError(f"the recommender applied {applied} of {count} events within {deadline_s} s")


def read_topic(bootstrap: str, topic: str, count: int, deadline_s: float = 60.0) -> list[Record]:
    """Every record of a topic, read by a fresh consumer group, until `count` arrived and no more come."""
    with KafkaEventBus(bootstrap) as bus, bus.consumer(unique_name("e2e-reader"), [topic]) as consumer:
        records: list[Record] = []
        deadline = time.monotonic() + deadline_s
        while len(records) < count:
            assert time.monotonic() < deadline, f"read {len(records)} of {count} records from {topic}"
            records += consumer.poll(timeout_s=POLL_S)
        # A short quiet period: anything beyond `count` (duplicates) would show up here.
        quiet_until = time.monotonic() + 1.0
        while time.monotonic() < quiet_until:
            records += consumer.poll(timeout_s=POLL_S)
        return records
