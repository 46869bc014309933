"""Run the vision server: `python -m snaplearn_vision.main` or `snaplearn-vision`.

One process (VisionServer) or, with `--workers N`, a supervisor of N of them behind one port
(snaplearn_vision.process.supervisor). SIGTERM/SIGINT drain: health NOT_SERVING, in-flight
calls finish, the batchers stop, the event publisher flushes; the ready file is removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from snaplearn_common.errors import NotFound
from snaplearn_common.files import write_ready_file
from snaplearn_common.ports import PortInUse, check_free

if TYPE_CHECKING:
    from snaplearn_vision.config import VisionSettings

# The server stack (gRPC, numpy, the core, the settings) is imported where it is used, so that
# `snaplearn-vision models ...` does not pay for it.

log = logging.getLogger("snaplearn_vision")


async def serve(settings: VisionSettings) -> int:
    """Run one server until SIGTERM/SIGINT; returns the process exit code."""
    from snaplearn_vision.process.worker import stop_with_parent, supervisor_pid
    from snaplearn_vision.server import VisionServer

    # The event loop thread answers every RPC (refusals included) and must win the GIL back
    # quickly from the decode and model threads, and they from it: a thread that releases the
    # GIL around C work (a JPEG decode, a forward pass) waits up to this long to get it back.
    sys.setswitchinterval(settings.gil_switch_interval_ms / 1000.0)
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop_requested.set)
    if settings.worker_index is not None:
        # After the handlers: a supervisor already gone means a SIGTERM, handled as a stop.
        stop_with_parent(supervisor_pid())
    server = VisionServer(settings)
    exit_code = 0
    try:
        starting = asyncio.create_task(server.start())
        stopping = asyncio.create_task(stop_requested.wait())
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            log.info("stop requested while loading the model")
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
            return 0
        stopping.cancel()
        starting.result()  # re-raise a failed start
        # Everything alive now (torch, the model, gRPC) lives as long as the server: move it out
        # of the collector's sight, or every full collection walks all of it and stalls the
        # event loop, which answers every call, refusals included.
        gc.freeze()
        # The file first: whoever sees the line may read the file next.
        if settings.ready_file is not None:
            write_ready_file(
                settings.ready_file,
                {
                    "host": settings.host,
                    "port": server.port,
                    "metrics_port": server.metrics_port,
                    "pid": os.getpid(),
                },
            )
        line = server.ready_line()
        if settings.worker_index is None:  # a worker's readiness is its ready file
            print(line, flush=True)
        log.info("%s", line)
        await stop_requested.wait()
        log.info("stop requested: draining")
    except NotFound as exc:
        log.error(
            "%s; train the default model with `python -m snaplearn_vision.train --repository %s`",
            exc,
            settings.model_repository,
        )
        exit_code = 1
    except PortInUse as exc:  # taken while the model loaded: one sentence, no traceback
        print(f"snaplearn-vision: {exc}", file=sys.stderr)
        exit_code = 2
    except Exception:
        log.exception("vision server failed")
        exit_code = 1
    finally:
        await server.stop()
        if settings.ready_file is not None:
            settings.ready_file.unlink(missing_ok=True)
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        log.info("vision server stopped")
    return exit_code


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["models"]:  # `snaplearn-vision models add|list|remove` (snaplearn_vision.models)
        from snaplearn_vision.models import main as models_main

        return models_main(args[1:])
    from snaplearn_vision.config import settings_from_args

    settings = settings_from_args(argv)
    worker = "" if settings.worker_index is None else f"[worker {settings.worker_index}] "
    logging.basicConfig(
        level=settings.log_level,
        format=f"%(asctime)s %(levelname)s {worker}%(name)s: %(message)s",
        stream=sys.stderr,
    )
    if settings.worker_index is None:  # a worker joins its supervisor's port
        try:  # before loading anything: a busy port is one sentence, not a traceback
            check_free(settings.host, {"--port": settings.port, "--metrics-port": settings.metrics_port})
        except PortInUse as exc:
            print(f"snaplearn-vision: {exc}", file=sys.stderr)
            return 2
    if settings.workers > 1:
        from snaplearn_vision.process.supervisor import supervise

        return asyncio.run(supervise(settings, list(sys.argv[1:] if argv is None else argv)))
    if settings.torch_threads is not None:
        import torch

        torch.set_num_threads(settings.torch_threads)
    return asyncio.run(serve(settings))


if __name__ == "__main__":
    sys.exit(main())
