"""The most trusted systems test: a three-node Kafka cluster losing its busiest leader, and the
trainer SIGKILLed in a loop, under a steady Classify load through the real vision server.

The cluster (tests/helpers/kafka_cluster.py) is three KRaft nodes, each broker and controller;
the system's topic has replication factor 3 and min.insync.replicas 2, and the vision server's
producer uses acks=all (snaplearn_common.eventbus.kafka). While Classify calls arrive:

1. the node leading the most partitions is SIGKILLed; the others elect new leaders, the ISR
   shrinks to two (still enough for acks=all), and the load goes on; later the node is started
   again on its data and rejoins every ISR;
2. the recommender (the trainer app) is SIGKILLed and restarted, several times.

Then: no Classify failed, every event (by event id, read back from the topic) was produced once
per call, and the model applied each exactly once (its applied count equals the calls).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import TracebackType

import pytest

from snaplearn_client import VisionClient
from snaplearn_common.events import HEADER_EVENT_ID
from snaplearn_vision.worksheets import sample_image_bytes
from tests.helpers.kafka_cluster import MIN_INSYNC_REPLICAS, REPLICATION_FACTOR, KafkaCluster
from tests.helpers.kafka_system import PARTITIONS, KafkaSystem, read_topic
from tests.helpers.vision_model import trained_model_repository  # noqa: F401  (fixture)

REQUESTS_PER_S = 4.0
TRAINER_KILLS = 3
# Calls that must succeed between steps: the load is seen to go on at each stage.
CALLS_PER_STAGE = 12


class ClassifyLoad:
    """A client thread calling Classify at a fixed rate, remembering each answered request id."""

    def __init__(self, target: str, rate_per_s: float) -> None:
        self._target, self._interval_s = target, 1.0 / rate_per_s
        self._photos = [sample_image_bytes(t, seed=700 + i) for i, t in enumerate(("fractions", "geometry"))]
        self.request_ids: list[str] = []
        self.failures: list[str] = []
        self._answered = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="classify-load", daemon=True)

    def _run(self) -> None:
        with VisionClient(self._target, timeout_s=15) as vision:
            next_at = time.monotonic()
            i = 0
            while not self._stop.is_set():
                request_id = f"cluster-{i:05d}"
                try:
                    reply = vision.classify(self._photos[i % 2], f"student-{i % 7}", request_id=request_id)
                    assert reply.request_id == request_id and reply.labels
                    with self._answered:
                        self.request_ids.append(request_id)
                        self._answered.notify_all()
                except Exception as exc:  # recorded, asserted on by the test
                    self.failures.append(f"{request_id}: {exc!r}")
                i += 1
                next_at += self._interval_s
                self._stop.wait(max(0.0, next_at - time.monotonic()))

    def wait_more(self, calls: int, timeout_s: float = 120.0) -> None:
        """Until `calls` more Classify calls than now have succeeded."""
        with self._answered:
            target = len(self.request_ids) + calls
            assert self._answered.wait_for(lambda: len(self.request_ids) >= target, timeout_s), (
                f"{len(self.request_ids)} of {target} Classify calls answered; failures: {self.failures[-3:]}"
            )

    def __enter__(self) -> ClassifyLoad:
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join(30)


@pytest.mark.kafka
@pytest.mark.slow
def test_three_node_cluster_leader_and_trainer_kills_lose_nothing(
    tmp_path: Path,
    trained_model_repository: Path,  # noqa: F811
) -> None:
    started = time.monotonic()
    with KafkaCluster(tmp_path / "kafka") as cluster:
        system = KafkaSystem(cluster.bootstrap, tmp_path / "system")
        cluster.create_topic(system.topic, PARTITIONS)
        partitions = cluster.wait_isr(system.topic, REPLICATION_FACTOR)
        assert all(p["replicas"] == [1, 2, 3] for p in partitions)
        assert cluster.topic_config(system.topic)["min.insync.replicas"] == str(MIN_INSYNC_REPLICAS)
        results: list[tuple[str, int | None, str]] = []
        try:
            system.start_vision(trained_model_repository)
            system.start_recommender()
            with ClassifyLoad(system.vision_target, REQUESTS_PER_S) as load:
                load.wait_more(CALLS_PER_STAGE)  # steady state first

                leader = cluster.busiest_leader(system.topic)
                led = [p["partition"] for p in partitions if p["leader"] == leader.node_id]
                cluster.kill(leader)
                killed_at = len(load.request_ids)
                shrunk = cluster.wait_isr(system.topic, REPLICATION_FACTOR - 1)
                assert all(p["leader"] != leader.node_id for p in shrunk), shrunk
                load.wait_more(CALLS_PER_STAGE)  # writes go on with two in-sync replicas
                cluster.start_node(leader)
                cluster.wait_isr(system.topic, REPLICATION_FACTOR)  # it caught up and rejoined
                restarted_at = len(load.request_ids)

                for _ in range(TRAINER_KILLS):
                    load.wait_more(CALLS_PER_STAGE // 2)
                    system.kill_recommender()
                    system.start_recommender()
                load.wait_more(CALLS_PER_STAGE // 2)

            assert load.failures == [], "no Classify may fail while a node or the trainer is down"
            requested = set(load.request_ids)
            assert len(requested) == len(load.request_ids)

            applied = system.wait_applied(len(requested), deadline_s=180)
            records = read_topic(system.bootstrap, system.topic, len(requested), deadline_s=120)
            event_ids = [(record.header(HEADER_EVENT_ID) or b"").decode() for record in records]
            assert set(event_ids) == requested, "every call's event is on the topic, and nothing else"
            time.sleep(2.0)  # would a replayed or duplicated event be applied a second time?
            assert system.events_applied() == applied == len(requested), "each event applied exactly once"
            assert system.vision_metric("snaplearn_vision_events_dropped_total") == 0
            assert system.recommender_starts == TRAINER_KILLS + 1
        finally:
            results = system.stop()
    for name, code, tail in results:
        assert code == 0, f"{name} did not stop cleanly:\n{tail}"
    print(  # reported in docs/benchmarks/kafka_cluster.md
        f"\nnode {leader.node_id} (leader of partitions {led}) SIGKILLed after {killed_at} calls, back at "
        f"{restarted_at}; trainer SIGKILLed {TRAINER_KILLS}x; {len(requested)} Classify ok, 0 failed; "
        f"{len(records)} records ({len(records) - len(set(event_ids))} duplicate on the topic); "
        f"applied {applied}; {time.monotonic() - started:.0f} s"
    )
