"""Run the vision server: `python -m snaplearn_vision.main` or `snaplearn-vision`.

Start-up order makes readiness honest: the gRPC port is bound first with health
NOT_SERVING, the default model is loaded (and warmed up), then health flips to SERVING
and the ready line is printed. SIGTERM/SIGINT drain in the reverse order: health
NOT_SERVING, stop accepting RPCs and let in-flight ones finish, stop the batchers, flush
the event publisher.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snaplearn_common.errors import NotFound
from snaplearn_common.eventbus.base import EventBus, Producer
from snaplearn_common.eventbus.factory import open_bus
from snaplearn_common.eventbus.publisher import EventPublisher
from snaplearn_common.eventbus.spool import DiskSpool
from snaplearn_common.events import IMAGE_CLASSIFIED_TOPIC
from snaplearn_common.metrics import MetricsEndpoint, serve_metrics
from snaplearn_common.server import GrpcServer, start_grpc_server
from snaplearn_vision import oip_servicer
from snaplearn_vision.config import VisionSettings, settings_from_args
from snaplearn_vision.metrics import VisionMetrics
from snaplearn_vision.service import BatchingOverrides, ClassificationService, ModelSource
from snaplearn_vision.servicer import SERVICE_NAME, VisionServicer

log = logging.getLogger("snaplearn_vision")

# Room for the other ClassifyRequest fields around the largest accepted image, so that an
# oversized image gets our INVALID_ARGUMENT message rather than gRPC's RESOURCE_EXHAUSTED.
_MESSAGE_OVERHEAD_BYTES = 64 * 1024
# Set by the supervisor in each worker's environment.
SUPERVISOR_PID_ENV = "SNAPLEARN_VISION_SUPERVISOR_PID"


@dataclass(frozen=True)
class RepositoryModels:
    """A ModelSource over the on-disk repository, loading on the configured device."""

    root: Path
    device: str
    max_image_bytes: int
    precision: str = "fp32"
    channels_last: bool = True
    compile_model: bool = False

    def load(self, name: str, version: str | None = None) -> Any:
        # Import torch only when serving.
        from snaplearn_vision.engine import InferenceSettings
        from snaplearn_vision.model_repository import ModelRepository

        inference = InferenceSettings(
            precision=self.precision, channels_last=self.channels_last, compile=self.compile_model
        )
        return ModelRepository(self.root).load(
            name,
            version or None,
            device=self.device,
            max_image_bytes=self.max_image_bytes,
            inference=inference,
        )


class VisionServer:
    """The whole server as one object: metrics endpoint, publisher, core and gRPC server.

    models: where models come from (default: the repository in settings).
    bus: an event bus to publish to, owned by the caller (default: settings.bus, opened and
    closed here; no bus at all when both are None: predictions are then not published).
    """

    def __init__(
        self, settings: VisionSettings, *, models: ModelSource | None = None, bus: EventBus | None = None
    ) -> None:
        self.settings = settings
        self.metrics = VisionMetrics()
        self._models: ModelSource = models or RepositoryModels(
            settings.model_repository,
            settings.device,
            settings.max_image_bytes,
            settings.precision,
            settings.channels_last,
            settings.compile_model,
        )
        self._bus = bus
        self._owns_bus = bus is None
        self._producer: Producer | None = None
        self._spool: DiskSpool | None = None
        self.publisher: EventPublisher | None = None
        self.service: ClassificationService | None = None
        self.grpc: GrpcServer | None = None
        self._vision_servicer: VisionServicer | None = None
        self._metrics_endpoint: MetricsEndpoint | None = None

    @property
    def port(self) -> int:
        assert self.grpc is not None, "server not started"
        return self.grpc.port

    @property
    def metrics_port(self) -> int:
        assert self._metrics_endpoint is not None, "server not started"
        return self._metrics_endpoint.port

    @property
    def target(self) -> str:
        return f"{self.settings.host}:{self.port}"

    async def listen(self) -> None:
        """Bind the metrics and gRPC ports (health NOT_SERVING) and start the publisher."""
        await self.open()
        await self.bind(serving=False)

    async def open(self) -> None:
        """Everything but the gRPC port: metrics endpoint, publisher, the (unloaded) core."""
        settings = self.settings
        # A worker's metrics are read (and summed) by its supervisor only.
        metrics_host = "127.0.0.1" if settings.worker_index is not None else settings.host
        self._metrics_endpoint = serve_metrics(self.metrics.registry, metrics_host, settings.metrics_port)
        if self._bus is None and settings.bus is not None:
            self._bus = await asyncio.to_thread(open_bus, settings.bus)
            # Idempotent; on Kafka this is where the topic gets its partition count.
            await asyncio.to_thread(self._bus.create_topic, settings.bus.topic, settings.bus.partitions)
        if self._bus is not None:
            self._producer = self._bus.producer()
            if settings.spool_dir is not None:
                # Opening scans what an earlier run left to replay: disk I/O, off the loop.
                self._spool = await asyncio.to_thread(DiskSpool, settings.spool_dir)
            self.publisher = EventPublisher(
                self._producer,
                spool=self._spool,
                topics={IMAGE_CLASSIFIED_TOPIC: settings.bus.topic} if settings.bus else None,
                registry=self.metrics.registry,
                metric_prefix="snaplearn_vision_events",
            )
            self.publisher.start()
        self.service = ClassificationService(
            self._models,
            default_model_name=settings.model_name,
            default_model_version=settings.model_version or None,
            publisher=self.publisher,
            metrics=self.metrics,
            batching=BatchingOverrides(
                max_batch_size=settings.max_batch_size,
                max_queue_delay_ms=settings.max_queue_delay_ms,
                max_queue_size=settings.max_queue_size,
            ),
            decode_threads=settings.decode_threads,
            decode_niceness=settings.decode_niceness,
            decoder=settings.decoder,
            max_image_bytes=settings.max_image_bytes,
        )

    async def bind(self, serving: bool) -> None:
        """Start the gRPC server on the configured port."""
        settings = self.settings
        assert self.service is not None, "call open() first"
        self._vision_servicer = VisionServicer(self.service)
        self.grpc = await start_grpc_server(
            [self._vision_servicer.register, oip_servicer.registrar(self.service)],
            [SERVICE_NAME, oip_servicer.SERVICE_NAME],
            host=settings.host,
            port=settings.port,
            serving=serving,
            max_message_bytes=settings.max_image_bytes + _MESSAGE_OVERHEAD_BYTES,
            max_connection_age_s=settings.max_connection_age_s,
            maximum_concurrent_rpcs=settings.rpc_cap(),
            max_pending_calls=settings.max_pending_calls,
            reuse_port=settings.worker_index is not None,
        )

    async def load_and_serve(self) -> None:
        """Load the default model, then report SERVING."""
        assert self.service is not None and self.grpc is not None, "call listen() first"
        await self.service.start()
        await self.grpc.set_serving(True)

    async def start(self) -> None:
        await self.listen()
        await self.load_and_serve()

    async def start_as_worker(self) -> None:
        """Load first, then join the shared port already SERVING: a worker that listens takes
        a share of new connections, so it must not listen before it can answer them."""
        await self.open()
        assert self.service is not None
        await self.service.start()
        await self.bind(serving=True)

    async def stop(self) -> None:
        """Graceful: NOT_SERVING, drain RPCs, stop batchers, flush events. Safe to call twice."""
        if self.grpc is not None:
            if self._vision_servicer is not None:
                # Streams would otherwise take new items until the grace ends and then be cut
                # with items on them; ended OK, their clients resend what was not started.
                self._vision_servicer.drain_streams()
            await self.grpc.stop(self.settings.shutdown_grace_s)
            self.grpc = None
        if self.service is not None:
            await self.service.stop(drain=True)
            self.service = None
        if self.publisher is not None:
            await asyncio.to_thread(self.publisher.stop)
            self.publisher = None
        if self._producer is not None:
            await asyncio.to_thread(self._producer.close)
            self._producer = None
        if self._spool is not None:
            self._spool.close()
            self._spool = None
        if self._bus is not None and self._owns_bus:
            await asyncio.to_thread(self._bus.close)
            self._bus = None
        if self._metrics_endpoint is not None:
            self._metrics_endpoint.stop()
            self._metrics_endpoint = None

    def ready_line(self) -> str:
        return f"vision server ready on {self.settings.host}:{self.port} (metrics :{self.metrics_port})"


def write_ready_file(path: Path, payload: dict[str, object]) -> None:
    """Write `payload` as JSON atomically (write, then rename): a reader never sees half a file.

    Every ready file has host, port, metrics_port and pid; a supervisor's adds its workers."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    staging.write_text(json.dumps(payload) + "\n")
    staging.replace(path)


_PR_SET_PDEATHSIG = 1


def stop_with_parent(expected_parent: int) -> None:
    """Linux: a worker gets SIGTERM (and drains) when its supervisor dies, even by SIGKILL,
    rather than serve unwatched. Elsewhere a no-op."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    if os.getppid() != expected_parent:  # the supervisor died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


async def serve(settings: VisionSettings) -> int:
    """Run until SIGTERM/SIGINT; returns the process exit code."""
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
        stop_with_parent(int(os.environ.get(SUPERVISOR_PID_ENV, os.getppid())))
    server = VisionServer(settings)
    exit_code = 0
    try:
        if settings.worker_index is None:
            await server.listen()
            log.info("listening on %s (NOT_SERVING until the model is loaded)", server.target)
            loading = asyncio.create_task(server.load_and_serve())
        else:
            loading = asyncio.create_task(server.start_as_worker())
        stopping = asyncio.create_task(stop_requested.wait())
        await asyncio.wait({loading, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not loading.done():
            log.info("stop requested while loading the model")
            loading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loading
            return 0
        stopping.cancel()
        loading.result()  # re-raise a failed load
        # Everything alive now (torch, the model, gRPC) lives as long as the server: move it out
        # of the collector's sight, or every full collection walks those ~10^5 objects and
        # stalls the event loop (every answer, refusals included) for tens of milliseconds.
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
    settings = settings_from_args(argv)
    worker = "" if settings.worker_index is None else f"[worker {settings.worker_index}] "
    logging.basicConfig(
        level=settings.log_level,
        format=f"%(asctime)s %(levelname)s {worker}%(name)s: %(message)s",
        stream=sys.stderr,
    )
    if settings.workers > 1:
        from snaplearn_vision.workers import supervise

        return asyncio.run(supervise(settings, list(sys.argv[1:] if argv is None else argv)))
    if settings.torch_threads is not None:
        import torch

        torch.set_num_threads(settings.torch_threads)
    return asyncio.run(serve(settings))


if __name__ == "__main__":
    sys.exit(main())
