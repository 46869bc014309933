"""The recommender rides out a Kafka outage, against a real broker and a real recommender process.

- Started while the broker is down, it stays up (NOT_SERVING), says once what it waits for,
  and applies events once the broker is back, without a restart.
- While the broker is down it keeps writing checkpoints on their interval, and logs the
  outage once when it starts and once when it ends (none of kafka-python's own lines).
- SIGKILLed under load, a restarted recommender (static group membership) takes its
  partitions back without waiting for the dead member's session timeout; the takeover
  time and the replay size are printed (docs/benchmarks/bus.md).
"""

from __future__ import annotations

import itertools
import re
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from snaplearn_common.eventbus.kafka import KafkaEventBus
from snaplearn_common.events import encode_image_classified
from snaplearn_recommender.checkpoint import Checkpointer
from snaplearn_recommender.servicer import SERVICE_NAME
from tests.helpers import kafka_broker
from tests.helpers.kafka_broker import KafkaBroker
from tests.helpers.kafka_system import PARTITIONS, KafkaSystem

controllable_kafka_broker = kafka_broker.controllable_kafka_broker

OUTAGE_START = re.compile(r"WARNING snaplearn_recommender\.worker: event bus .* unreachable while")
OUTAGE_END = re.compile(r"WARNING snaplearn_recommender\.worker: event bus .* reachable again after")
# kafka-python's own loggers are named kafka.*: none of their lines belong in the log.
LIBRARY_LINE = re.compile(r" (DEBUG|INFO|WARNING|ERROR|CRITICAL) kafka\.")


@pytest.fixture
def broker(controllable_kafka_broker: KafkaBroker) -> Iterator[KafkaBroker]:
    """The session's broker; started again at the end if the test left it down."""
    try:
        yield controllable_kafka_broker
    finally:
        if not _reachable(controllable_kafka_broker.bootstrap):
            controllable_kafka_broker.start()


def _reachable(bootstrap: str) -> bool:
    host, port = bootstrap.rsplit(":", 1)
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((host, int(port))) == 0


@pytest.fixture
def system(broker: KafkaBroker, tmp_path: Path) -> Iterator[KafkaSystem]:
    system = KafkaSystem(broker.bootstrap, tmp_path)
    try:
        yield system
    finally:
        results = system.stop()
    for name, code, tail in results:
        assert code == 0, f"{name} did not stop cleanly:\n{tail}"


def produce(bootstrap: str, topic: str, start: int, count: int) -> None:
    with KafkaEventBus(bootstrap) as bus:
        bus.create_topic(topic, PARTITIONS)
        with bus.producer() as producer:
            for i in range(start, start + count):
                event = encode_image_classified(
                    f"outage-{i:06d}",
                    f"student-{i % 11}",
                    1_700_000_000.0 + i,
                    "m",
                    "1",
                    [("fractions", 0.8)],
                )
                producer.send(topic, event.value, key=event.key, headers=event.headers)
            producer.flush(60)


def readiness(target: str) -> int:
    with grpc.insecure_channel(target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5
        )
        return int(reply.status)


def recommender_log(system: KafkaSystem) -> list[str]:
    assert system.recommender is not None
    return system.recommender.log_path.read_text(errors="replace").splitlines()


def metric(system: KafkaSystem, name: str) -> float:
    url = f"http://127.0.0.1:{system.recommender_ports['metrics_port']}/metrics"
    with urllib.request.urlopen(url, timeout=10) as reply:
        for line in reply.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def checkpoint_state(system: KafkaSystem) -> tuple[float, int] | None:
    """(created_at, events covered) of the recommender's checkpoint file, if there is one."""
    try:
        checkpoint = Checkpointer(system.data_dir / "recommender").load()
    except (EOFError, OSError):
        return None
    if checkpoint is None:
        return None
    return checkpoint.created_at, sum(checkpoint.offsets.values())


def _matching(lines: list[str], pattern: re.Pattern[str]) -> list[str]:
    return [line for line in lines if pattern.search(line)]


@pytest.mark.kafka
def test_recommender_started_while_the_broker_is_down_comes_up_when_it_returns(
    system: KafkaSystem, broker: KafkaBroker
) -> None:
    broker.stop()
    system.start_recommender()  # its ready file: the process is up, whatever the bus does
    assert system.recommender is not None and system.recommender.process is not None
    pid = system.recommender.process.pid
    assert readiness(system.recommender_target) == health_pb2.HealthCheckResponse.NOT_SERVING
    # Past the old 30 s subscription limit, and through several retries.
    deadline = time.monotonic() + 35.0
    while time.monotonic() < deadline:
        assert system.recommender.process.poll() is None, system.recommender.log_tail(40)
        time.sleep(1.0)
    assert readiness(system.recommender_target) == health_pb2.HealthCheckResponse.NOT_SERVING

    broker.start()
    produce(system.bootstrap, system.topic, 0, 120)
    assert system.wait_applied(120, deadline_s=120) == 120
    ready_deadline = time.monotonic() + 10
    while readiness(system.recommender_target) != health_pb2.HealthCheckResponse.SERVING:
        assert time.monotonic() < ready_deadline, "readiness did not turn SERVING once subscribed"
        time.sleep(0.1)
    assert system.recommender.process.pid == pid and system.recommender_starts == 1

    lines = recommender_log(system)
    waiting = [line for line in lines if "waiting for the event bus" in line]
    assert len(waiting) == 1 and "NOT_SERVING" in waiting[0], "\n".join(lines[-40:])
    assert len(_matching(lines, OUTAGE_START)) == 1, "\n".join(lines[-40:])
    ends = _matching(lines, OUTAGE_END)
    assert len(ends) == 1 and "subscribed" in ends[0], "\n".join(lines[-40:])
    assert _matching(lines, LIBRARY_LINE) == [], "kafka-python's lines stay out of the log"
    assert metric(system, "snaplearn_recommender_worker_bus_outages_total") == 1


@pytest.mark.kafka
def test_checkpoints_advance_and_the_outage_is_logged_once(system: KafkaSystem, broker: KafkaBroker) -> None:
    system.checkpoint_interval_s = 1.0
    system.start_recommender()
    produce(system.bootstrap, system.topic, 0, 300)
    assert system.wait_applied(300, deadline_s=120) == 300

    broker.stop()
    down_at = time.time()
    # Checkpoints go on being written on their interval, holding every applied event.
    written: set[float] = set()
    deadline = time.monotonic() + 30
    while len(written) < 4:
        assert time.monotonic() < deadline, f"only {len(written)} checkpoints during the outage"
        state = checkpoint_state(system)
        if state is not None and state[0] > down_at:
            assert state[1] == 300, "the checkpoint holds what the model applied"
            written.add(state[0])
        time.sleep(0.2)
    stamps = sorted(written)
    assert max(b - a for a, b in itertools.pairwise(stamps)) < 6.0, stamps
    outage_s = time.time() - down_at
    broker.start()

    produce(system.bootstrap, system.topic, 300, 100)
    assert system.wait_applied(400, deadline_s=120) == 400
    end_deadline = time.monotonic() + 20
    while not _matching(recommender_log(system), OUTAGE_END):
        assert time.monotonic() < end_deadline, "no end-of-outage line"
        time.sleep(0.2)
    lines = recommender_log(system)
    assert len(_matching(lines, OUTAGE_START)) == 1, "\n".join(lines[-60:])
    ends = _matching(lines, OUTAGE_END)
    assert len(ends) == 1, "\n".join(lines[-60:])
    length = float(re.search(r"after ([0-9.]+) s", ends[0]).group(1))  # type: ignore[union-attr]
    assert 0.5 * outage_s < length < outage_s + 60, (length, outage_s)
    assert _matching(lines, LIBRARY_LINE) == [], "kafka-python's lines stay out of the log"
    assert not [line for line in lines if "Traceback" in line], "\n".join(lines[-60:])
    assert metric(system, "snaplearn_recommender_worker_bus_outages_total") == 1
    assert metric(system, "snaplearn_recommender_worker_bus_outage_seconds_total") > 0
    print(
        f"\noutage {outage_s:.1f} s: {len(written)} checkpoints written during it; logged as {length:.1f} s"
    )


@pytest.mark.kafka
@pytest.mark.parametrize("membership", ["static", "dynamic"])
def test_a_sigkilled_recommender_takes_its_partitions_back_fast(system: KafkaSystem, membership: str) -> None:
    # Static membership (the default): the restarted member takes the dead one's place at once,
    # even with a long session timeout. Dynamic: the group waits for the dead member's session
    # timeout (the default 10 s) before its partitions move, the baseline.
    static = membership == "static"
    system.session_timeout_s = 30.0 if static else 10.0
    if not static:
        system.recommender_args = ["--consumer-instance-id", ""]
    system.checkpoint_interval_s = 2.0
    system.start_recommender()
    produce(system.bootstrap, system.topic, 0, 200)
    system.wait_applied(200, deadline_s=120)

    stop = threading.Event()
    produced = [200]

    def steady() -> None:
        while not stop.is_set():
            produce(system.bootstrap, system.topic, produced[0], 20)
            produced[0] += 20
            stop.wait(0.1)

    feeder = threading.Thread(target=steady, name="feeder", daemon=True)
    feeder.start()
    try:
        time.sleep(3.0)
        applied_at_kill = system.events_applied()
        system.kill_recommender()
        killed_at = time.monotonic()
        state = checkpoint_state(system)
        assert state is not None
        replay = applied_at_kill - state[1]
        system.start_recommender()
        ready_at = time.monotonic()
        # Restored from the checkpoint; the takeover ends when it applies past it.
        while system.events_applied() <= state[1]:
            assert time.monotonic() - ready_at < 25.0, "no partitions within 25 s of the restart"
            time.sleep(0.05)
        took_over_at = time.monotonic()
    finally:
        stop.set()
        feeder.join(60)
    total = produced[0]
    assert system.wait_applied(total, deadline_s=120) == total
    time.sleep(1.0)
    assert system.events_applied() == total, "each event applied exactly once"
    takeover_s = took_over_at - ready_at
    if static:
        assert takeover_s < 10.0, f"takeover took {takeover_s:.1f} s (session timeout 30 s)"
    else:  # the dead member keeps the partitions until its session times out
        assert took_over_at - killed_at > 5.0, f"took over {took_over_at - killed_at:.1f} s after the kill"
    print(
        f"\n{membership} membership, session timeout {system.session_timeout_s:.0f} s: "
        f"takeover after SIGKILL: {takeover_s:.2f} s from the restarted process's ready file to its "
        f"first new event ({took_over_at - killed_at:.2f} s from the kill, process start included); "
        f"replayed {replay} event(s) (checkpoint every {system.checkpoint_interval_s:.0f} s); "
        f"applied {total} of {total}"
    )
