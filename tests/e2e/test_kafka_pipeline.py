"""The whole pipeline over a real Apache Kafka broker, servers as separate processes.

photo -> vision server -> ImageClassified on Kafka (keyed by user, typed headers) ->
recommender -> Recommend reflects it; a poison record goes to the dead-letter topic with
its error and origin, and the partition keeps flowing.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from snaplearn_client import RecommenderClient, VisionClient
from snaplearn_common.eventbus.base import partition_for_key
from snaplearn_common.eventbus.kafka import KafkaEventBus
from snaplearn_common.events import (
    HEADER_EVENT_ID,
    HEADER_EVENT_TYPE,
    HEADER_SCHEMA_VERSION,
    IMAGE_CLASSIFIED_TYPE,
    SCHEMA_VERSION,
    decode_image_classified,
    encode_image_classified,
)
from snaplearn_vision.worksheets import sample_image_bytes
from tests.helpers import kafka_broker
from tests.helpers.kafka_system import PARTITIONS, KafkaSystem, read_topic
from tests.helpers.vision_model import trained_model_repository  # noqa: F401  (fixture)

kafka_bootstrap = kafka_broker.kafka_bootstrap

STUDENTS = {"kafka-fractions-fan": "fractions", "kafka-geometry-fan": "geometry"}
PHOTOS_PER_STUDENT = 5


def _share(items, topic: str) -> float:  # type: ignore[no-untyped-def]
    return sum(topic in item.concepts for item in items) / max(len(items), 1)


@pytest.fixture(scope="module")
def system(
    kafka_bootstrap: str,
    trained_model_repository: Path,  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[KafkaSystem]:
    system = KafkaSystem(kafka_bootstrap, tmp_path_factory.mktemp("kafka-pipeline"))
    try:
        system.start_vision(trained_model_repository)
        system.start_recommender()
        yield system
    finally:
        results = system.stop()
    for name, code, tail in results:
        assert code == 0, f"{name} did not stop cleanly:\n{tail}"


@pytest.mark.kafka
def test_classify_over_kafka_moves_each_student_toward_their_photos(system: KafkaSystem) -> None:
    with (
        VisionClient(system.vision_target, timeout_s=30) as vision,
        RecommenderClient(system.recommender_target) as recommender,
    ):
        before = {user: recommender.recommend(user, k=10) for user in STUDENTS}
        assert all(reply.cold_start for reply in before.values())
        applied_before = system.events_applied()
        request_ids = []
        for i in range(PHOTOS_PER_STUDENT):
            for user, topic in STUDENTS.items():
                request_id = f"pipeline-{user}-{i}"
                reply = vision.classify(
                    sample_image_bytes(topic, seed=700 + i), user, top_k=3, request_id=request_id
                )
                assert reply.request_id == request_id
                request_ids.append(request_id)
        system.wait_applied(applied_before + len(request_ids))
        after = {user: recommender.recommend(user, k=10) for user in STUDENTS}
    for user, topic in STUDENTS.items():
        other = next(t for t in STUDENTS.values() if t != topic)
        assert not after[user].cold_start
        assert _share(after[user].items, topic) > _share(before[user].items, topic)
        assert _share(after[user].items, topic) > _share(after[user].items, other)

    # What went over the wire: keyed by user (so one partition per user), typed headers,
    # the request id as the event id.
    records = read_topic(system.bootstrap, system.topic, len(request_ids))
    by_id = {record.header(HEADER_EVENT_ID): record for record in records}
    assert set(by_id) >= {rid.encode() for rid in request_ids}
    for request_id in request_ids:
        record = by_id[request_id.encode()]
        message = decode_image_classified(record)
        assert record.key == message.user_id.encode()
        assert record.partition == partition_for_key(record.key, PARTITIONS)
        assert record.header(HEADER_EVENT_TYPE) == IMAGE_CLASSIFIED_TYPE.encode()
        assert record.header(HEADER_SCHEMA_VERSION) == SCHEMA_VERSION.encode()
        assert message.event_id == request_id
    assert system.vision_metric("snaplearn_vision_events_dropped_total") == 0


@pytest.mark.kafka
def test_poison_records_go_to_the_dead_letter_topic_and_the_partition_keeps_flowing(
    system: KafkaSystem,
) -> None:
    user = "kafka-poisoned-student"  # every record below lands on this user's partition
    good = [
        encode_image_classified(f"dlq-good-{i}", user, 1_700_000_000.0 + i, "m", "1", [("fractions", 0.9)])
        for i in range(4)
    ]
    future_version = (*good[0].headers[:1], (HEADER_SCHEMA_VERSION, b"99"), (HEADER_EVENT_ID, b"dlq-future"))
    applied_before = system.events_applied()
    with KafkaEventBus(system.bootstrap) as bus, bus.producer() as producer:
        producer.send(system.topic, good[0].value, key=good[0].key, headers=good[0].headers)
        producer.send(
            system.topic, b"\xff\x00 not a protobuf", key=user.encode(), headers=good[0].headers[:2]
        )
        producer.send(system.topic, good[1].value, key=good[1].key, headers=good[1].headers)
        producer.send(system.topic, good[2].value, key=user.encode(), headers=future_version)
        for event in good[2:]:
            producer.send(system.topic, event.value, key=event.key, headers=event.headers)
        producer.flush(30)
    # The records after each poison record are applied: the partition did not stop.
    assert system.wait_applied(applied_before + len(good)) == applied_before + len(good)

    dead = read_topic(system.bootstrap, system.dead_letter_topic, 2)
    assert len(dead) == 2
    partition = partition_for_key(user.encode(), PARTITIONS)
    malformed, unknown_version = sorted(dead, key=lambda r: int(r.header("dlq-origin-offset") or b"0"))
    assert malformed.value == b"\xff\x00 not a protobuf"
    assert b"malformed" in (malformed.header("dlq-error") or b"")
    assert b"schema version" in (unknown_version.header("dlq-error") or b"")
    assert unknown_version.header(HEADER_EVENT_ID) == b"dlq-future"  # original headers kept
    for record in dead:
        assert record.key == user.encode()
        assert record.header("dlq-origin-topic") == system.topic.encode()
        assert record.header("dlq-origin-partition") == str(partition).encode()
        assert record.header("dlq-consumer-group") == system.group.encode()
    origin_offsets = [int(r.header("dlq-origin-offset") or b"-1") for r in (malformed, unknown_version)]
    assert origin_offsets[1] - origin_offsets[0] == 2  # poison, good, poison on one partition


@pytest.mark.kafka
def test_feedback_over_kafka_trains_the_model_and_hides_a_skipped_item(system: KafkaSystem) -> None:
    user, item = "kafka-feedback-student", "geometry-001"
    with RecommenderClient(system.recommender_target) as recommender:
        applied_before = system.events_applied()
        assert recommender.record_feedback(user, item, "completed", request_id="kafka-fb-1").accepted
        system.wait_applied(applied_before + 1)
        top = recommender.recommend(user, k=10, exclude_seen=True).items[0].item_id
        assert recommender.record_feedback(user, top, "skipped", request_id="kafka-fb-2").accepted
        system.wait_applied(applied_before + 2)
        after = recommender.recommend(user, k=10, exclude_seen=True)
    # Applied at all means the event-type header survived Kafka (else: dead-lettered as a bad photo).
    assert not after.cold_start and top not in {i.item_id for i in after.items}
