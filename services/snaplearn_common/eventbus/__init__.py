"""The event bus: one interface (base.py) with Kafka's semantics, several backends.

- embedded (sqlite.py): the default; durable, works across processes on one machine.
- kafka (kafka.py): Apache Kafka for real deployments.

factory.open_bus(BusSettings) opens the configured one; publisher.EventPublisher is how a
server publishes without blocking a request, with spool.DiskSpool as its outbox.
"""

from snaplearn_common.eventbus.base import (
    Consumer,
    DeliveryFailed,
    EventBus,
    Producer,
    ProducerRecord,
    Record,
    TopicPartition,
    partition_for_key,
)

__all__ = [
    "Consumer",
    "DeliveryFailed",
    "EventBus",
    "Producer",
    "ProducerRecord",
    "Record",
    "TopicPartition",
    "partition_for_key",
]
