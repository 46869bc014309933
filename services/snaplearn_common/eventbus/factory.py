"""Opening the configured event bus: open_bus(BusSettings).

The settings themselves (flags, environment variables, defaults) are declared once, in
snaplearn_common.eventbus.settings; BusSettings is re-exported here for open_bus's callers.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import cast

from snaplearn_common.eventbus.base import EventBus
from snaplearn_common.eventbus.settings import BusSettings

__all__ = ["BusSettings", "open_bus"]


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
        path, session_timeout_s=settings.session_timeout_s, auto_create_partitions=settings.partitions
    )
