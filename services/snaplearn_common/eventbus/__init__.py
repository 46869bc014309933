"""The event bus: one interface (base.py) with Kafka's semantics, several backends.

- embedded (sqlite.py): the default; durable, works across processes on one machine.
- kafka (kafka.py): Apache Kafka for real deployments.
"""

from snaplearn_common.eventbus.base import (
    Consumer,
    EventBus,
    Producer,
    Record,
    TopicPartition,
    partition_for_key,
)

__all__ = ["Consumer", "EventBus", "Producer", "Record", "TopicPartition", "partition_for_key"]
