"""Prometheus metrics of the embedded event bus: its file's size and the offsets it retains.

Read at scrape time from the bus file (one small query per partition), so every process that
opens the bus can export them; the recommender does (trainer.py). Kafka's own metrics come
from the cluster, not from here.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from snaplearn_common.eventbus.base import EventBus

log = logging.getLogger(__name__)

PREFIX = "snaplearn_bus"


class EmbeddedBusCollector(Collector):
    """snaplearn_bus_file_bytes, snaplearn_bus_oldest_offset / _next_offset {topic, partition}."""

    def __init__(self, bus: EventBus) -> None:
        self._bus = bus

    def collect(self) -> Iterator[GaugeMetricFamily]:
        stats_of = getattr(self._bus, "stats", None)
        if stats_of is None:
            return
        try:
            stats = stats_of()
        except Exception:  # a closed bus, or a file briefly locked: no sample this scrape
            log.debug("could not read the embedded bus's stats", exc_info=True)
            return
        yield GaugeMetricFamily(
            f"{PREFIX}_file_bytes",
            "Bytes of the embedded bus's file and its write-ahead log",
            value=stats.file_bytes,
        )
        oldest = GaugeMetricFamily(
            f"{PREFIX}_oldest_offset",
            "Oldest offset still in the embedded log (retention deletes below it)",
            labels=["topic", "partition"],
        )
        following = GaugeMetricFamily(
            f"{PREFIX}_next_offset", "Offset the next record appended will get", labels=["topic", "partition"]
        )
        for tp, offset in sorted(stats.oldest_offsets.items()):
            oldest.add_metric([tp.topic, str(tp.partition)], offset)
        for tp, offset in sorted(stats.next_offsets.items()):
            following.add_metric([tp.topic, str(tp.partition)], offset)
        yield oldest
        yield following


def watch_embedded_bus(bus: EventBus, registry: CollectorRegistry) -> bool:
    """Export the bus's metrics in registry if it is the embedded bus; True if it is."""
    if not callable(getattr(bus, "stats", None)):
        return False
    registry.register(EmbeddedBusCollector(bus))
    return True
