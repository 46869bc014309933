"""Opening the configured event bus: open_bus(BusSettings).

The settings themselves (flags, environment variables, defaults) are declared once, in
snaplearn_common.eventbus.settings; BusSettings is re-exported here for open_bus's callers.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, cast

from snaplearn_common.eventbus.base import EventBus
from snaplearn_common.eventbus.settings import BusSettings

if TYPE_CHECKING:
    from snaplearn_common.eventbus.sqlite import RetentionPolicy

__all__ = ["BusSettings", "open_bus", "retention_policy"]


def open_bus(settings: BusSettings) -> EventBus:
    """Open the configured bus; the caller closes it."""
    if settings.backend == "kafka":
        # Imported lazily: kafka-python is an optional dependency the embedded bus never needs.
        kafka_module = importlib.import_module("snaplearn_common.eventbus.kafka")
        return cast(EventBus, kafka_module.KafkaEventBus.from_settings(settings))
    from snaplearn_common.eventbus.sqlite import SqliteEventBus

    path = Path(settings.embedded_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return SqliteEventBus(
        path,
        session_timeout_s=settings.session_timeout_s,
        auto_create_partitions=settings.partitions,
        retention=retention_policy(settings),
    )


def retention_policy(settings: BusSettings) -> RetentionPolicy:
    """The embedded bus's retention from the settings (0 turns a limit off)."""
    from snaplearn_common.eventbus.sqlite import RetentionPolicy

    return RetentionPolicy(
        max_age_ms=int(settings.retention_age_s * 1000) or None,
        max_bytes_per_partition=settings.retention_bytes or None,
        check_interval_s=settings.retention_check_interval_s,
    )
