"""`python -m snaplearn_recommender.main` (snaplearn-recommender): serve until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence

from snaplearn_common.eventbus.base import EventBus
from snaplearn_common.eventbus.factory import open_bus
from snaplearn_common.files import write_ready_file
from snaplearn_common.ports import PortInUse, check_free
from snaplearn_recommender.catalog import CatalogError
from snaplearn_recommender.config import RecommenderSettings, settings_from_args
from snaplearn_recommender.query import QueryApp
from snaplearn_recommender.trainer import TrainerApp

log = logging.getLogger("snaplearn_recommender")


async def start_app(settings: RecommenderSettings, bus: EventBus) -> TrainerApp | QueryApp:
    """The app for the settings' role: query serves published snapshots; standalone and trainer train."""
    if settings.role == "query":
        return await QueryApp.start(settings, bus)
    return await TrainerApp.start(settings, bus)


async def run(settings: RecommenderSettings) -> None:
    bus = open_bus(settings.bus)
    try:
        app = await start_app(settings, bus)
        stop_requested = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop_requested.set)
        log.info(
            "recommender (%s) listening on %s:%d (metrics :%d)%s",
            settings.role,
            settings.host,
            app.port,
            app.metrics_port,
            f"; snapshots in {settings.snapshot_dir}" if settings.snapshot_dir else "",
        )
        if settings.ready_file:
            write_ready_file(
                settings.ready_file,
                {
                    "host": settings.host,
                    "port": app.port,
                    "metrics_port": app.metrics_port,
                    "pid": os.getpid(),
                    "role": settings.role,
                },
            )
        await stop_requested.wait()
        log.info("shutting down: readiness off, stopping the worker or the snapshot follower, draining gRPC")
        await app.stop()
    finally:
        bus.close()


def main(argv: Sequence[str] | None = None) -> int:
    settings = settings_from_args(argv)
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        # Before opening the bus or the catalog: a busy port is one sentence, not a traceback.
        check_free(settings.host, {"--port": settings.port, "--metrics-port": settings.metrics_port})
        asyncio.run(run(settings))
    except (CatalogError, PortInUse) as exc:  # the user's files or ports: one sentence, no traceback
        print(f"snaplearn-recommender: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
