"""Delivery under faults, against a real broker and real server processes.

- The broker goes away for 20 s under steady Classify load: every Classify succeeds, the
  vision server spools and replays, every event arrives, and none is applied twice.
- The recommender is SIGKILLed at seeded random moments while events flow: after each
  restart it resumes from its checkpoint, and in the end it has applied every event once.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from snaplearn_client import VisionClient
from snaplearn_common.eventbus.kafka import KafkaEventBus
from snaplearn_common.events import HEADER_EVENT_ID, encode_image_classified
from snaplearn_vision.worksheets import sample_image_bytes
from tests.helpers import kafka_broker
from tests.helpers.kafka_broker import KafkaBroker
from tests.helpers.kafka_system import KafkaSystem, read_topic
from tests.helpers.vision_model import trained_model_repository  # noqa: F401  (fixture)

controllable_kafka_broker = kafka_broker.controllable_kafka_broker

OUTAGE_S = 20.0
REQUESTS_PER_S = 4.0
KILLS = 3
KILL_SEED = 20240607


@pytest.fixture
def system(
    controllable_kafka_broker: KafkaBroker,
    trained_model_repository: Path,  # noqa: F811
    tmp_path: Path,
) -> Iterator[KafkaSystem]:
    system = KafkaSystem(controllable_kafka_broker.bootstrap, tmp_path)
    try:
        yield system
    finally:
        results = system.stop()
    for name, code, tail in results:
        assert code == 0, f"{name} did not stop cleanly:\n{tail}"


class SteadyClassifyLoad:
    """A client thread calling Classify at a fixed rate with request ids it remembers."""

    def __init__(self, target: str, rate_per_s: float) -> None:
        self._target, self._interval_s = target, 1.0 / rate_per_s
        self._photos = [
            sample_image_bytes(topic, seed=900 + i) for i, topic in enumerate(("fractions", "geometry"))
        ]
        self.request_ids: list[str] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="classify-load", daemon=True)

    def _run(self) -> None:
        with VisionClient(self._target, timeout_s=10) as vision:
            next_at = time.monotonic()
            i = 0
            while not self._stop.is_set():
                request_id = f"fault-{i:05d}"
                try:
                    reply = vision.classify(self._photos[i % 2], f"student-{i % 5}", request_id=request_id)
                    assert reply.request_id == request_id and reply.labels
                    self.request_ids.append(request_id)
                except Exception as exc:  # recorded, asserted on by the test
                    self.failures.append(f"{request_id}: {exc!r}")
                i += 1
                next_at += self._interval_s
                self._stop.wait(max(0.0, next_at - time.monotonic()))

    def __enter__(self) -> SteadyClassifyLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


@pytest.mark.kafka
def test_broker_outage_loses_nothing_and_applies_nothing_twice(
    system: KafkaSystem,
    controllable_kafka_broker: KafkaBroker,
    trained_model_repository: Path,  # noqa: F811
) -> None:
    system.start_vision(trained_model_repository)
    system.start_recommender()
    broker_down = False
    try:
        with SteadyClassifyLoad(system.vision_target, REQUESTS_PER_S) as load:
            time.sleep(3.0)  # steady state first
            controllable_kafka_broker.stop()
            broker_down = True
            down_since = time.monotonic()
            time.sleep(OUTAGE_S)  # the outage itself is what this test is about
            sent_during_outage = len(load.request_ids)
            spooled = system.vision_metric("snaplearn_vision_events_spooled_total")
            controllable_kafka_broker.start()
            broker_down = False
            outage_s = time.monotonic() - down_since
            time.sleep(3.0)  # load keeps running across the recovery
    finally:
        if broker_down:
            controllable_kafka_broker.start()  # never leave the session's broker down
    assert load.failures == [], "Classify must not fail while the broker is down"
    requested = set(load.request_ids)
    assert len(requested) >= REQUESTS_PER_S * (OUTAGE_S + 4) * 0.7 and sent_during_outage > 0
    assert spooled > 0, "events published during the outage went to the spool"

    applied = system.wait_applied(len(requested), deadline_s=120)
    records = read_topic(system.bootstrap, system.topic, len(requested))
    event_ids = [record.header(HEADER_EVENT_ID) for record in records]
    assert {eid.decode() for eid in event_ids if eid} == requested, "every event arrived, no stray ones"
    time.sleep(2.0)  # would a late duplicate be applied?
    assert system.events_applied() == applied == len(requested), "each event applied exactly once"
    assert system.vision_metric("snaplearn_vision_events_dropped_total") == 0
    assert system.vision_metric("snaplearn_vision_events_published_total") >= len(requested)
    print(  # reported in docs/benchmarks/bus.md
        f"\noutage {outage_s:.1f} s: {len(requested)} Classify ok, {len(records)} records "
        f"({len(records) - len(set(event_ids))} duplicate), spooled {spooled:.0f}, applied {applied}"
    )


@pytest.mark.kafka
def test_sigkilled_recommender_applies_every_event_exactly_once(system: KafkaSystem) -> None:
    rng = random.Random(KILL_SEED)
    total = 900
    produced = 0
    done = threading.Event()

    def produce() -> None:
        nonlocal produced
        with KafkaEventBus(system.bootstrap) as bus, bus.producer() as producer:
            for i in range(total):
                event = encode_image_classified(
                    f"kill-{i:05d}", f"student-{i % 13}", 1_700_000_000.0 + i, "m", "1", [("fractions", 0.8)]
                )
                producer.send(system.topic, event.value, key=event.key, headers=event.headers)
                if i % 25 == 24:
                    producer.flush(30)
                    produced = i + 1
                    time.sleep(0.05)  # ~ 400 events/s, spread over the kills
            producer.flush(30)
            produced = total
        done.set()

    system.start_recommender()
    producer_thread = threading.Thread(target=produce, name="producer", daemon=True)
    producer_thread.start()
    applied_at_kill = []
    for _ in range(KILLS):
        time.sleep(rng.uniform(0.5, 2.5))  # a random moment of the consume loop
        applied_at_kill.append(system.events_applied())
        system.kill_recommender()
        system.start_recommender()
    producer_thread.join(120)
    assert done.is_set() and produced == total
    applied = system.wait_applied(total, deadline_s=120)
    time.sleep(2.0)  # would a replayed event be applied twice?
    assert system.events_applied() == applied == total, (
        f"applied {applied} of {total} (kills at {applied_at_kill})"
    )
    assert system.recommender_starts == KILLS + 1
    print(f"\nkills at applied={applied_at_kill}; final applied {applied} of {total} produced")
