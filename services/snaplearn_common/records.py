"""What the event bus carries: records (as read, and as sent), headers, topic partitions.

At the bottom of the package, so that the event codecs (events.py) and the bus
(eventbus/) can both use them without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

Headers = tuple[tuple[str, bytes], ...]


class TopicPartition(NamedTuple):
    topic: str
    partition: int


@dataclass(frozen=True, slots=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: Headers = field(default=())
    timestamp_ms: int = 0

    @property
    def topic_partition(self) -> TopicPartition:
        return TopicPartition(self.topic, self.partition)

    def header(self, name: str) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None


@dataclass(frozen=True, slots=True)
class ProducerRecord:
    """A record to append; the bus chooses its partition (from the key) and offset."""

    topic: str
    value: bytes
    key: bytes | None = None
    headers: Headers = ()

    @classmethod
    def of(cls, topic: str, value: bytes, key: bytes | None = None, headers: Headers = ()) -> ProducerRecord:
        """A record from caller-supplied values, checked and copied (bytearray, memoryview)."""
        if not isinstance(value, bytes | bytearray | memoryview):
            raise TypeError(f"value must be bytes, not {type(value).__name__}")
        if key is not None and not isinstance(key, bytes | bytearray | memoryview):
            raise TypeError(f"key must be bytes or None, not {type(key).__name__}")
        return cls(
            topic,
            bytes(value),
            None if key is None else bytes(key),
            tuple((name, bytes(header)) for name, header in headers),
        )
