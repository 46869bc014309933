"""A real Apache Kafka broker for the tests marked `kafka`.

`kafka_bootstrap` (session-scoped) yields "host:port":

- SNAPLEARN_KAFKA_BOOTSTRAP set: that cluster is used as is (CI with a Kafka service, or a
  developer's own broker). Tests create uniquely named topics and groups on it.
- otherwise: `scripts/kafka.sh fetch` (Maven, cached after the first run) and `start` run a
  single-node KRaft broker on free loopback ports with its own data directory, which is
  stopped and deleted at the end of the session, so a developer's `.kafka/` broker on the
  default port is never touched.

A missing Java or Maven FAILS the tests (with the script's message) instead of skipping
them: CI must not go green without having run the Kafka suite.

Use it from a test module by binding the fixture there:

    from tests.helpers import kafka_broker
    kafka_bootstrap = kafka_broker.kafka_bootstrap

Fault tests bind `controllable_kafka_broker` too: a `KafkaBroker` whose stop()/start()
take the same broker down and bring it back with its data (same ports, same log dirs).
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
KAFKA_SCRIPT = REPO_ROOT / "scripts" / "kafka.sh"
ENV_BOOTSTRAP = "SNAPLEARN_KAFKA_BOOTSTRAP"

# Generous: a cold fetch downloads ~45 MB of jars through Maven (about 25 s here); a start
# took 4-10 s on a 2-core machine and must not flake when the machine is busy.
FETCH_TIMEOUT_S = 900
START_TIMEOUT_S = 180
STOP_TIMEOUT_S = 60


def unique_name(prefix: str) -> str:
    """A topic or group name no other test (or earlier run on a shared cluster) uses."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def _free_port() -> int:
    """A free loopback port below the kernel's ephemeral range.

    A broker that is stopped and started again (the fault tests) keeps its ports; while it is
    down, a port from the ephemeral range could be handed to any socket bound to port 0 (another
    test's server, under pytest-xdist), and the restart would fail. Ports below the range are
    never handed out that way.
    """
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for port in random.sample(range(max(1024, low - 12000), low), 200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


def _run_script(command: str, env: dict[str, str], timeout_s: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(KAFKA_SCRIPT), command],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def _fail(what: str, result: subprocess.CompletedProcess[str] | None, hint: str = "") -> None:
    output = ""
    if result is not None:
        output = "\n".join(part for part in (result.stdout.strip(), result.stderr.strip()) if part)
        output = "\n".join(output.splitlines()[-40:])
    pytest.fail(f"{what}\n{hint}\n{output}".strip(), pytrace=False)


class KafkaBroker:
    """A single-node broker run by scripts/kafka.sh in its own directory; stop() keeps its data."""

    def __init__(self, data_dir: Path) -> None:
        self.env = {
            **os.environ,
            "SNAPLEARN_KAFKA_DIR": str(data_dir),
            "SNAPLEARN_KAFKA_PORT": str(_free_port()),
            "SNAPLEARN_KAFKA_CONTROLLER_PORT": str(_free_port()),
            # The readiness check imports kafka-python: use the interpreter running the tests.
            "SNAPLEARN_PYTHON": sys.executable,
        }
        self.bootstrap = ""

    def start(self) -> str:
        """Start (or restart, with the same ports and data) and return the bootstrap address."""
        try:
            started = _run_script("start", self.env, START_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            _fail(f"scripts/kafka.sh start did not finish within {START_TIMEOUT_S} s.", None, _HINT)
        if started.returncode != 0:
            _fail("scripts/kafka.sh start failed.", started, _HINT)
        lines = started.stdout.strip().splitlines()
        if not lines:
            _fail("scripts/kafka.sh start printed no bootstrap address.", started)
        self.bootstrap = lines[-1].strip()
        return self.bootstrap

    def stop(self) -> None:
        """SIGTERM (then SIGKILL after the script's timeout); topics and offsets stay on disk."""
        stopped = _run_script("stop", self.env, STOP_TIMEOUT_S)
        if stopped.returncode != 0:
            _fail("scripts/kafka.sh stop failed.", stopped)

    def wipe(self) -> None:
        _run_script("wipe", self.env, STOP_TIMEOUT_S)


_HINT = (
    "The Kafka tests run a real broker with scripts/kafka.sh, which needs Java 17+ and "
    "Maven on PATH (apt install openjdk-17-jre-headless maven), or set "
    f"{ENV_BOOTSTRAP}=host:port to use a running broker."
)
_session_broker: KafkaBroker | None = None


def _fetch_and_start(data_dir: Path) -> KafkaBroker:
    if shutil.which("java") is None:
        _fail("java not found on PATH.", None, _HINT)
    if shutil.which("bash") is None:
        _fail("bash not found on PATH.", None, _HINT)
    broker = KafkaBroker(data_dir)
    try:
        fetched = _run_script("fetch", broker.env, FETCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _fail(f"scripts/kafka.sh fetch did not finish within {FETCH_TIMEOUT_S} s.", None, _HINT)
    if fetched.returncode != 0:
        _fail("scripts/kafka.sh fetch failed.", fetched, _HINT)
    try:
        broker.start()
    except BaseException:
        # wipe = stop (SIGTERM, then SIGKILL) + delete the data directory, even half-way.
        broker.wipe()
        raise
    return broker


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> str:
    existing = os.environ.get(ENV_BOOTSTRAP, "").strip()
    if existing:
        return existing
    return _own_broker(tmp_path_factory, request).bootstrap


@pytest.fixture(scope="session")
def controllable_kafka_broker(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> KafkaBroker:
    """A broker the test may stop and start: the session's own one, or, when the session uses an
    external cluster (SNAPLEARN_KAFKA_BOOTSTRAP), a private one started for these tests."""
    if os.environ.get(ENV_BOOTSTRAP, "").strip():
        broker = _fetch_and_start(tmp_path_factory.mktemp("kafka-broker-private"))
        request.addfinalizer(broker.wipe)
        return broker
    return _own_broker(tmp_path_factory, request)


def _own_broker(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> KafkaBroker:
    """The session's broker, started on first use and wiped when the session ends."""
    global _session_broker
    if _session_broker is None:
        _session_broker = _fetch_and_start(tmp_path_factory.mktemp("kafka-broker"))
        broker = _session_broker

        def wipe() -> None:
            global _session_broker
            broker.wipe()
            _session_broker = None

        # Registered on the session-scoped request: runs when the session ends, so no
        # broker outlives the test run.
        request.addfinalizer(wipe)
    return _session_broker
