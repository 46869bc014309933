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
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
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
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    existing = os.environ.get(ENV_BOOTSTRAP, "").strip()
    if existing:
        yield existing
        return

    hint = (
        "The Kafka tests run a real broker with scripts/kafka.sh, which needs Java 17+ and "
        "Maven on PATH (apt install openjdk-17-jre-headless maven), or set "
        f"{ENV_BOOTSTRAP}=host:port to use a running broker."
    )
    if shutil.which("java") is None:
        _fail("java not found on PATH.", None, hint)
    if shutil.which("bash") is None:
        _fail("bash not found on PATH.", None, hint)

    data_dir = tmp_path_factory.mktemp("kafka-broker")
    env = {
        **os.environ,
        "SNAPLEARN_KAFKA_DIR": str(data_dir),
        "SNAPLEARN_KAFKA_PORT": str(_free_port()),
        "SNAPLEARN_KAFKA_CONTROLLER_PORT": str(_free_port()),
        # The readiness check imports kafka-python: use the interpreter running the tests.
        "SNAPLEARN_PYTHON": sys.executable,
    }
    try:
        fetched = _run_script("fetch", env, FETCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _fail(f"scripts/kafka.sh fetch did not finish within {FETCH_TIMEOUT_S} s.", None, hint)
    if fetched.returncode != 0:
        _fail("scripts/kafka.sh fetch failed.", fetched, hint)

    try:
        try:
            started = _run_script("start", env, START_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            _fail(f"scripts/kafka.sh start did not finish within {START_TIMEOUT_S} s.", None, hint)
        if started.returncode != 0:
            _fail("scripts/kafka.sh start failed.", started, hint)
        lines = started.stdout.strip().splitlines()
        if not lines:
            _fail("scripts/kafka.sh start printed no bootstrap address.", started)
        yield lines[-1].strip()
    finally:
        # wipe = stop (SIGTERM, then SIGKILL) + delete the session's data directory; runs even
        # when start failed half-way, so no broker outlives the test session.
        _run_script("wipe", env, STOP_TIMEOUT_S)
