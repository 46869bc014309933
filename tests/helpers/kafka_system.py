"""The vision server and the recommender as real processes on a real Kafka broker.

Each `KafkaSystem` gets its own topic (and so its own dead-letter topic) and consumer group,
so tests sharing the session broker never see each other's events. Ports are 0 (the
processes report theirs in ready files), the model is the small trained test model.
"""

from __future__ import annotations

import shutil
import signal
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from snaplearn_client import RecommenderClient
from snaplearn_common.eventbus.base import Record
from snaplearn_common.eventbus.kafka import KafkaEventBus
from snaplearn_common.launcher import ManagedProcess
from tests.contract.eventbus_contract import POLL_S
from tests.helpers.kafka_broker import unique_name

READY_TIMEOUT_S = 120.0
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

    @property
    def dead_letter_topic(self) -> str:
        return self.topic + ".dlq"

    def _bus_args(self) -> list[str]:
        return [
            "--bus", "kafka", "--kafka-bootstrap", self.bootstrap, "--bus-topic", self.topic,
            "--bus-partitions", str(PARTITIONS), "--bus-session-timeout", str(self.session_timeout_s),
        ]  # fmt: skip

    def start_vision(self, models: Path) -> None:
        shutil.copytree(models, self.data_dir / "models", dirs_exist_ok=True)
        run = self.data_dir / "run"
        self.vision = ManagedProcess(
            "vision server",
            [
                sys.executable, "-m", "snaplearn_vision.main", "--port", "0", "--metrics-port", "0",
                "--model-repository", str(self.data_dir / "models"),
                "--spool-dir", str(self.data_dir / "spool"),
                "--ready-file", str(run / "vision.json"), *self._bus_args(),
            ],
            self.data_dir / "logs" / "vision.log",
            run / "vision.json",
        )  # fmt: skip
        self.vision.start()
        self.vision_ports = self.vision.wait_ready(READY_TIMEOUT_S)

    def start_recommender(self) -> None:
        run = self.data_dir / "run"
        self.recommender_starts += 1
        self.recommender = ManagedProcess(
            "recommender",
            [
                sys.executable, "-m", "snaplearn_recommender.main", "--port", "0", "--metrics-port", "0",
                "--checkpoint-dir", str(self.data_dir / "recommender"),
                "--checkpoint-interval", str(self.checkpoint_interval_s),
                "--consumer-group", self.group,
                "--ready-file", str(run / "recommender.json"), *self._bus_args(),
            ],
            self.data_dir / "logs" / "recommender.log",
            run / "recommender.json",
        )  # fmt: skip
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
