"""A real three-node Apache Kafka cluster (KRaft) on loopback, for the cluster failure test.

Each node is one JVM that is both broker and controller, so the controller quorum has three
voters (a static quorum, `controller.quorum.voters`) and survives one node down. Topics default
to replication factor 3 and min.insync.replicas 2, like a production cluster: with acks=all (what
snaplearn_common.eventbus.kafka's producers use) a write is confirmed once two replicas have it,
and a partition keeps accepting writes while one node is down.

The jars are those `scripts/kafka.sh fetch` puts in the cache, and each node's settings are
what `scripts/kafka.sh config` writes (the script itself runs one node; here it only fetches
and writes configs), so the single-node and cluster brokers stay alike. Ports are drawn below
the ephemeral range (as tests/helpers/kafka_broker.py does), because a SIGKILLed node is
restarted on the same ports and data: a port from the ephemeral range could meanwhile be
handed to any socket bound to 0.

    with KafkaCluster(tmp_path) as cluster:
        cluster.create_topic("t", partitions=4)
        cluster.kill(cluster.leader_of("t", 0))   # SIGKILL
        cluster.start_node(node)                  # same ports, same data
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from kafka import KafkaAdminClient
from kafka.admin import NewTopic

from tests.helpers.kafka_broker import _free_port, _run_script

NODES = 3
REPLICATION_FACTOR = 3
MIN_INSYNC_REPLICAS = 2
HOST = "127.0.0.1"
FETCH_TIMEOUT_S = 900.0
START_TIMEOUT_S = 240.0
# Three JVMs on a small shared machine: small heaps, C1 only (startup, not throughput, matters).
JVM_OPTS = [
    "-Xms64m",
    "-Xmx384m",
    "-XX:+UseG1GC",
    "-XX:TieredStopAtLevel=1",
    "-XX:+ExitOnOutOfMemoryError",
    "-Djava.awt.headless=true",
]


def kafka_libs() -> Path:
    """The jars directory, fetched by scripts/kafka.sh (Maven, cached) if needed."""
    fetched = _run_script("fetch", dict(os.environ), FETCH_TIMEOUT_S)
    if fetched.returncode != 0:
        raise RuntimeError(f"scripts/kafka.sh fetch failed:\n{fetched.stderr[-3000:]}")
    version = os.environ.get("SNAPLEARN_KAFKA_VERSION", "4.4.0")
    cache = Path(os.environ.get("SNAPLEARN_CACHE", Path.home() / ".cache" / "snaplearn"))
    libs = cache / f"kafka-{version}" / "libs"
    if not libs.is_dir():
        raise RuntimeError(f"scripts/kafka.sh fetch succeeded but {libs} is missing")
    return libs


@dataclass
class KafkaNode:
    node_id: int
    port: int
    controller_port: int
    directory: Path
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def config_file(self) -> Path:
        return self.directory / "server.properties"

    @property
    def log_file(self) -> Path:
        return self.directory / "kafka.log"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None and self.process.poll() is None else None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


class KafkaCluster:
    """Three KRaft nodes (broker + controller each) in `directory`; stopped and left on disk at exit."""

    def __init__(self, directory: Path, nodes: int = NODES) -> None:
        self.directory = directory
        self.libs = kafka_libs()
        self.nodes = [
            KafkaNode(i + 1, _free_port(), _free_port(), directory / f"node-{i + 1}") for i in range(nodes)
        ]
        self._cluster_id = ""

    @property
    def bootstrap(self) -> str:
        return ",".join(node.address for node in self.nodes)

    def node(self, node_id: int) -> KafkaNode:
        return next(node for node in self.nodes if node.node_id == node_id)

    # -- lifecycle ----------------------------------------------------------------------

    def _write_config(self, node: KafkaNode) -> None:
        """The node's server.properties and log4j2.properties, written by `scripts/kafka.sh
        config`: the single-node broker's settings, with this cluster's quorum and replication."""
        voters = ",".join(f"{n.node_id}@{HOST}:{n.controller_port}" for n in self.nodes)
        env = {
            **os.environ,
            "SNAPLEARN_KAFKA_DIR": str(node.directory),
            "SNAPLEARN_KAFKA_NODE_ID": str(node.node_id),
            "SNAPLEARN_KAFKA_PORT": str(node.port),
            "SNAPLEARN_KAFKA_CONTROLLER_PORT": str(node.controller_port),
            "SNAPLEARN_KAFKA_VOTERS": voters,
            "SNAPLEARN_KAFKA_PARTITIONS": "4",
            "SNAPLEARN_KAFKA_REPLICATION": str(REPLICATION_FACTOR),
            "SNAPLEARN_KAFKA_MIN_ISR": str(MIN_INSYNC_REPLICAS),
        }
        written = _run_script("config", env, 60.0)
        if written.returncode != 0:
            raise RuntimeError(f"scripts/kafka.sh config failed:\n{written.stderr[-3000:]}")

    def _java(self, node: KafkaNode, *args: str) -> list[str]:
        log4j = f"-Dlog4j2.configurationFile={node.directory / 'log4j2.properties'}"
        return ["java", *JVM_OPTS, log4j, "-cp", f"{self.libs}/*", *args]

    def _format(self, node: KafkaNode) -> None:
        command = self._java(
            node, "kafka.tools.StorageTool", "format", "-t", self._cluster_id, "-c", str(node.config_file)
        )
        with node.log_file.open("ab") as log_file:
            done = subprocess.run(
                command, stdout=log_file, stderr=subprocess.STDOUT, timeout=180, check=False
            )
        if done.returncode != 0:
            raise RuntimeError(f"formatting node {node.node_id} failed:\n{node.log_tail()}")

    def start(self) -> None:
        """Format every node's storage (one cluster id), start all three, wait for the quorum."""
        # A cluster id is 16 random bytes in base64url; one starting with '-' would read as a flag.
        while not self._cluster_id or self._cluster_id.startswith("-"):
            self._cluster_id = base64.urlsafe_b64encode(os.urandom(16)).decode().rstrip("=")
        for node in self.nodes:
            self._write_config(node)
            self._format(node)
        for node in self.nodes:
            self._spawn(node)
        self.wait_brokers(len(self.nodes))

    def _spawn(self, node: KafkaNode) -> None:
        with node.log_file.open("ab") as log_file:
            node.process = subprocess.Popen(
                self._java(node, "kafka.Kafka", str(node.config_file)),
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        node.starts += 1

    def start_node(self, node: KafkaNode) -> None:
        """Start a stopped or killed node again on its ports and data; wait until it is a broker again."""
        assert node.pid is None, f"node {node.node_id} is running"
        self._spawn(node)
        self.wait_brokers(len(self.nodes))

    def kill(self, node: KafkaNode) -> None:
        """SIGKILL: no controlled shutdown, no leadership handed over, page cache unflushed."""
        assert node.process is not None and node.process.poll() is None, f"node {node.node_id} is not running"
        node.process.send_signal(signal.SIGKILL)
        node.process.wait(30)

    def stop(self) -> None:
        """SIGTERM every running node (controlled shutdown), SIGKILL what has not exited in time."""
        running = [node for node in self.nodes if node.pid is not None]
        for node in running:
            assert node.process is not None
            with contextlib.suppress(ProcessLookupError):
                node.process.send_signal(signal.SIGTERM)
        for node in running:
            assert node.process is not None
            try:
                node.process.wait(60)
            except subprocess.TimeoutExpired:
                node.process.kill()
                node.process.wait(30)

    def __enter__(self) -> KafkaCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.stop()

    # -- admin --------------------------------------------------------------------------

    @contextlib.contextmanager
    def _admin(self) -> Any:
        logging.getLogger("kafka").setLevel(logging.CRITICAL)  # refusals from a killed node are expected
        admin = KafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=10000)
        try:
            yield admin
        finally:
            admin.close()

    def wait_brokers(self, count: int, timeout_s: float = START_TIMEOUT_S) -> None:
        """Until the cluster's metadata lists `count` brokers (registered and unfenced)."""
        deadline = time.monotonic() + timeout_s
        seen = 0
        while time.monotonic() < deadline:
            for node in self.nodes:
                if node.process is not None and node.process.poll() is not None:
                    raise RuntimeError(f"node {node.node_id} exited:\n{node.log_tail()}")
            with contextlib.suppress(Exception):
                with self._admin() as admin:
                    seen = len(admin.describe_cluster().get("brokers") or [])
                if seen >= count:
                    return
            time.sleep(0.5)
        tails = "\n".join(f"node {n.node_id}:\n{n.log_tail(15)}" for n in self.nodes)
        raise TimeoutError(f"{seen} of {count} brokers after {timeout_s:.0f} s\n{tails}")

    def create_topic(self, topic: str, partitions: int) -> None:
        with self._admin() as admin:
            admin.create_topics(
                [
                    NewTopic(
                        topic,
                        partitions,
                        REPLICATION_FACTOR,
                        topic_configs={"min.insync.replicas": str(MIN_INSYNC_REPLICAS)},
                    )
                ],
                timeout_ms=60000,
            )
            admin.wait_for_topics([topic], timeout_ms=60000)

    def partitions(self, topic: str) -> list[dict[str, Any]]:
        """Each partition of `topic` as {"partition", "leader", "replicas", "isr"} (leader -1: none)."""
        with self._admin() as admin:
            (info,) = admin.describe_topics([topic])
        parts = [
            {
                "partition": int(p["partition_index"]),
                "leader": int(p["leader_id"]),
                "replicas": sorted(p["replica_nodes"]),
                "isr": sorted(p["isr_nodes"]),
            }
            for p in info["partitions"]
        ]
        return sorted(parts, key=lambda p: p["partition"])

    def topic_config(self, topic: str) -> dict[str, str]:
        """The topic's configs that differ from the defaults, as key -> value."""
        from kafka.admin import ConfigResource, ConfigResourceType

        with self._admin() as admin:
            described = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
        # {resource type: {resource name: {key: {value, ...}}}}
        (by_name,) = described.values()
        return {key: str(data.get("value")) for key, data in by_name[topic].items()}

    def busiest_leader(self, topic: str) -> KafkaNode:
        """The node leading the most partitions of `topic`."""
        leaders = [int(p["leader"]) for p in self.partitions(topic)]
        return self.node(max(set(leaders), key=leaders.count))

    def wait_isr(self, topic: str, size: int, timeout_s: float = 120.0) -> list[dict[str, Any]]:
        """Until every partition of `topic` has `size` in-sync replicas and a leader."""
        deadline = time.monotonic() + timeout_s
        parts: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                parts = self.partitions(topic)
                if parts and all(len(p["isr"]) == size and int(p["leader"]) >= 0 for p in parts):
                    return parts
            time.sleep(0.5)
        raise TimeoutError(f"ISR of {topic} not {size} after {timeout_s:.0f} s: {parts}")
