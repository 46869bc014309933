"""KafkaEventBus against a real Apache Kafka broker: the shared contract plus Kafka specifics.

The broker comes from tests/helpers/kafka_broker.py: SNAPLEARN_KAFKA_BOOTSTRAP if set,
else a throwaway single-node broker started by scripts/kafka.sh for this session.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from snaplearn_common.errors import InvalidInput, NotFound, Unavailable
from snaplearn_common.eventbus.base import (
    DeliveryFailed,
    EventBus,
    ProducerRecord,
    TopicPartition,
    partition_for_key,
)
from snaplearn_common.eventbus.factory import open_bus
from snaplearn_common.eventbus.kafka import KafkaEventBus, security_config
from snaplearn_common.eventbus.settings import BusSettings
from tests.contract.eventbus_contract import DEADLINE_S, POLL_S, EventBusContract, poll_until, unique
from tests.helpers import kafka_broker

# Bound here so pytest finds the session fixture for this module.
kafka_bootstrap = kafka_broker.kafka_bootstrap


@pytest.mark.kafka
class TestKafkaEventBusContract(EventBusContract):
    @pytest.fixture(autouse=True)
    def _broker(self, kafka_bootstrap: str) -> None:
        self.bootstrap = kafka_bootstrap

    def make_bus(self, tmp_path: Path) -> EventBus:
        return KafkaEventBus(self.bootstrap)


@pytest.mark.kafka
class TestKafkaSpecifics:
    @pytest.fixture
    def bus(self, kafka_bootstrap: str) -> Iterator[KafkaEventBus]:
        with KafkaEventBus(kafka_bootstrap) as bus:
            yield bus

    def test_open_bus_from_settings(self, kafka_bootstrap: str) -> None:
        settings = BusSettings(backend="kafka", kafka_bootstrap_servers=kafka_bootstrap)
        topic = unique("factory")
        with open_bus(settings) as bus:
            assert isinstance(bus, KafkaEventBus)
            bus.create_topic(topic, 2)
            assert bus.partitions_for(topic) == 2

    def test_unknown_topic_is_not_found(self, bus: KafkaEventBus) -> None:
        missing = unique("missing")
        with pytest.raises(NotFound):
            bus.partitions_for(missing)
        with bus.producer() as producer:
            started = time.monotonic()
            with pytest.raises(NotFound):
                producer.send(missing, b"x", key=b"k")
            # Not kafka-python's max_block_ms wait for metadata that will never come.
            assert time.monotonic() - started < 10

    def test_end_offsets_of_unknown_partition_is_not_found(self, bus: KafkaEventBus) -> None:
        topic = unique("kafka")
        bus.create_topic(topic, 1)
        with bus.consumer(unique("g"), [topic]) as consumer, pytest.raises(NotFound):
            consumer.end_offsets([TopicPartition(topic, 5)])

    def test_seek_before_assignment_applies_when_assigned(self, bus: KafkaEventBus) -> None:
        # The recommender resumes from a model checkpoint: it seeks right after subscribing,
        # before the group has assigned anything.
        topic = unique("kafka")
        bus.create_topic(topic, 2)
        keys = [f"user-{i}".encode() for i in range(40)]
        with bus.producer() as producer:
            for i, key in enumerate(keys):
                producer.send(topic, f"{i}".encode(), key=key)
            producer.flush()
        counts = {p: sum(1 for k in keys if partition_for_key(k, 2) == p) for p in (0, 1)}
        with bus.consumer(unique("g"), [topic]) as consumer:
            assert consumer.assignment() == set()
            consumer.seek(TopicPartition(topic, 0), 5)
            records = poll_until(consumer, counts[0] - 5 + counts[1])
        offsets = {p: sorted(r.offset for r in records if r.partition == p) for p in (0, 1)}
        assert offsets[0] == list(range(5, counts[0]))
        assert offsets[1] == list(range(counts[1]))

    def test_seek_rejects_foreign_topic_and_negative_offset(self, bus: KafkaEventBus) -> None:
        topic = unique("kafka")
        bus.create_topic(topic, 1)
        with bus.consumer(unique("g"), [topic]) as consumer:
            with pytest.raises(InvalidInput):
                consumer.seek(TopicPartition(unique("other"), 0), 0)
            with pytest.raises(InvalidInput):
                consumer.seek(TopicPartition(topic, 0), -1)

    def test_delivery_failure_is_raised_by_flush(self, kafka_bootstrap: str, bus: KafkaEventBus) -> None:
        # A topic whose records may be at most 1 KB: the broker rejects a bigger batch, which
        # kafka-python reports only through the record's future.
        topic = unique("small")
        admin = bus._admin_client()
        admin.create_topics(
            {topic: {"num_partitions": 1, "replication_factor": -1, "configs": {"max.message.bytes": "1024"}}}
        )
        admin.wait_for_topics([topic], timeout_ms=int(DEADLINE_S * 1000))
        with bus.producer() as producer:
            producer.send(topic, os.urandom(8192), key=b"k")  # random: gzip cannot shrink it
            with pytest.raises(Exception, match=r"(?i)too ?large|MessageSizeTooLarge|RecordTooLarge"):
                producer.flush(timeout_s=DEADLINE_S)
            # The error is reported once; later sends work again.
            producer.send(topic, b"small", key=b"k")
            producer.flush(timeout_s=DEADLINE_S)
        with bus.consumer(unique("g"), [topic]) as consumer:
            records = poll_until(consumer, 1)
            assert [r.value for r in records] == [b"small"]
            assert consumer.poll(timeout_s=POLL_S) == []

    def test_group_settles_when_members_poll_in_turn(self, bus: KafkaEventBus) -> None:
        # Regression test for the kafka-python 3.0.x join-result loss (_patch_group_join):
        # without the patch, about one round in three left a member unassigned until its
        # session timed out. Several rounds make a regression show up reliably.
        topic = unique("kafka")
        bus.create_topic(topic, 4)
        everything = {TopicPartition(topic, p) for p in range(4)}
        for _ in range(4):
            group = unique("g")
            with bus.consumer(group, [topic]) as first, bus.consumer(group, [topic]) as second:
                deadline = time.monotonic() + 15.0  # settles in ~1.5 s with the patch
                while True:
                    first.poll(timeout_s=POLL_S)
                    second.poll(timeout_s=POLL_S)
                    a, b = first.assignment(), second.assignment()
                    if a and b and not a & b and a | b == everything:
                        break
                    assert time.monotonic() < deadline, f"group never settled: {a} / {b}"

    def test_closed_consumer_and_bus_refuse_work(self, bus: KafkaEventBus) -> None:
        topic = unique("kafka")
        bus.create_topic(topic, 1)
        consumer = bus.consumer(unique("g"), [topic])
        consumer.close()
        consumer.close()  # idempotent
        with pytest.raises(RuntimeError):
            consumer.poll(timeout_s=POLL_S)
        bus.close()
        with pytest.raises(RuntimeError):
            bus.create_topic(unique("kafka"), 1)


class TestSecurityConfig:
    """Settings pass-through; no broker needed."""

    def test_passes_security_options_through(self) -> None:
        config = security_config(
            {
                "security_protocol": "sasl_ssl",
                "sasl_mechanism": "SCRAM-SHA-512",
                "sasl_plain_username": "svc",
                "sasl_plain_password": "secret",
                "ssl_cafile": "/etc/ca.pem",
                "ssl_check_hostname": "false",
                "ssl_certfile": None,
            }
        )
        assert config == {
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": "SCRAM-SHA-512",
            "sasl_plain_username": "svc",
            "sasl_plain_password": "secret",
            "ssl_cafile": "/etc/ca.pem",
            "ssl_check_hostname": False,
        }

    @pytest.mark.parametrize("key", ["bootstrap_servers", "ssl_cafiel", "group_id"])
    def test_rejects_other_keys(self, key: str) -> None:
        with pytest.raises(InvalidInput):
            security_config({key: "x"})

    def test_from_settings_needs_bootstrap(self) -> None:
        with pytest.raises(InvalidInput):
            KafkaEventBus.from_settings(BusSettings(backend="kafka", kafka_bootstrap_servers=""))

    def test_constructing_the_bus_does_not_connect(self) -> None:
        # Clients are created on first use, so a bus for an unreachable cluster costs nothing.
        KafkaEventBus("127.0.0.1:1").close()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # closed again when this returns: nothing listens


def test_an_unreachable_cluster_is_unavailable_quietly_and_without_hanging(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # No broker at all: a real kafka-python client against a closed port.
    caplog.set_level(logging.DEBUG, logger="snaplearn_common")
    with KafkaEventBus(f"127.0.0.1:{_closed_port()}", request_timeout_s=1.0, bootstrap_timeout_s=1.0) as bus:
        started = time.monotonic()
        producer = bus.producer()  # handed out at once; it connects on its first batch
        assert time.monotonic() - started < 0.5
        with pytest.raises(DeliveryFailed) as failed:
            producer.send_batch([ProducerRecord("t", b"x")], timeout_s=5)
        assert failed.value.failed == (0,) and failed.value.permanent == ()
        with pytest.raises(Unavailable, match="cannot reach Kafka"):
            bus.create_topic("t", 1)
        with pytest.raises(Unavailable, match="cannot reach Kafka"):
            bus.consumer("g", ["t"])
        assert time.monotonic() - started < 15
        producer.close()
    assert logging.getLogger("kafka").level == logging.CRITICAL
    library = [r for r in caplog.records if r.name.startswith("kafka")]
    assert library == [], [r.getMessage() for r in library]
