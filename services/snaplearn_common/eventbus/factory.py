"""Opening the configured event bus: open_bus(BusSettings).

The settings themselves (flags, environment variables, defaults) are declared once, in
snaplearn_common.eventbus.settings.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import cast

from snaplearn_common.eventbus.base import EventBus
from snaplearn_common.eventbus.settings import BACKENDS, Backend, BusSettings
from snaplearn_common.settings import add_arguments

__all__ = [
    "BACKENDS",
    "DEFAULT_PARTITIONS",
    "Backend",
    "BusSettings",
    "add_bus_arguments",
    "bus_settings_from_args",
    "open_bus",
]


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


# -- transitional: for callers that still build their own argparse parser ---------------------
# TODO(issue 18): remove once the vision and recommender settings nest BusSettings.

_SHIM_PREFIX = ("bus",)
DEFAULT_PARTITIONS: int = BusSettings.model_fields["partitions"].default


def add_bus_arguments(parser: argparse.ArgumentParser) -> None:
    """Add BusSettings' flags to a hand-written parser (use BusSettings nested instead)."""
    add_arguments(parser, BusSettings, _SHIM_PREFIX)


def bus_settings_from_args(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> BusSettings:
    """BusSettings from flags added by add_bus_arguments, then the environment, then defaults."""
    values = {
        name: getattr(args, f"bus.{name}")
        for name in BusSettings.model_fields
        if hasattr(args, f"bus.{name}")
    }
    return BusSettings.from_env(environ, **values)
