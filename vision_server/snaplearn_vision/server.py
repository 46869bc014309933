"""The whole vision server as one object with one lifecycle: `async with VisionServer(settings)`.

start() composes its parts on an exit stack: the metrics endpoint, the event bus (when it
owns one), the spool, the producer and the publisher, the classification core, the gRPC
server. stop() closes the stack, so they stop in the reverse order: the gRPC server drains
its calls first, then the core finishes what it admitted, then the publisher flushes its
events, and so on down.

Start-up order makes readiness honest. A single server binds its port first with health
NOT_SERVING, loads (and warms up) the default model, then reports SERVING. A worker (one of
`--workers N`) shares its port with the others, and the kernel hands a share of new
connections to whichever listens, so it loads first and only then binds, already SERVING.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from snaplearn_common.eventbus.base import EventBus
from snaplearn_common.eventbus.factory import open_bus
from snaplearn_common.eventbus.publisher import EventPublisher
from snaplearn_common.eventbus.spool import DiskSpool
from snaplearn_common.events import IMAGE_CLASSIFIED_TOPIC
from snaplearn_common.metrics import MetricsEndpoint, serve_metrics
from snaplearn_common.server import GrpcServer, start_grpc_server
from snaplearn_vision.config import VisionSettings
from snaplearn_vision.core.metrics import VisionMetrics
from snaplearn_vision.core.service import ClassificationService, LoadedModel, ModelSource
from snaplearn_vision.edges import oip
from snaplearn_vision.edges.vision import SERVICE_NAME, VisionServicer
from snaplearn_vision.schema import BatchingOverrides, DeviceChoice, Precision

log = logging.getLogger(__name__)

# Room for the other ClassifyRequest fields around the largest accepted image, so that an
# oversized image gets our INVALID_ARGUMENT message rather than gRPC's RESOURCE_EXHAUSTED.
_MESSAGE_OVERHEAD_BYTES = 64 * 1024


@dataclass(frozen=True)
class RepositoryModels:
    """A ModelSource over the on-disk repository, loading on the configured device."""

    root: Path
    device: DeviceChoice
    max_image_bytes: int
    precision: Precision = "fp32"
    channels_last: bool = True
    compile_model: bool = False

    def load(self, name: str, version: str | None = None) -> LoadedModel:
        # torch is imported when a model is loaded, not when the settings are read.
        from snaplearn_vision.runtime.engine import InferenceSettings
        from snaplearn_vision.runtime.model_repository import ModelRepository

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
    """Metrics endpoint, publisher, core and gRPC server, started and stopped together.

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
        self._stack: contextlib.AsyncExitStack | None = None
        self.publisher: EventPublisher | None = None
        self.service: ClassificationService | None = None
        self.grpc: GrpcServer | None = None
        self._vision_servicer: VisionServicer | None = None  # its streams are drained first on stop
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

    def ready_line(self) -> str:
        return f"vision server ready on {self.settings.host}:{self.port} (metrics :{self.metrics_port})"

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Start every part and serve; if a part fails (or start is cancelled, as a stop
        requested while the model loads does), what had started is stopped again."""
        assert self._stack is None, "server already started"
        self._stack = stack = contextlib.AsyncExitStack()
        try:
            await self._start(stack)
        except BaseException:
            await self.stop()
            raise

    async def _start(self, stack: contextlib.AsyncExitStack) -> None:
        settings = self.settings
        worker = settings.worker_index is not None
        # A worker's metrics are read (and summed) by its supervisor only.
        metrics_host = "127.0.0.1" if worker else settings.host
        self._metrics_endpoint = serve_metrics(self.metrics.registry, metrics_host, settings.metrics_port)
        stack.callback(self._forget, "_metrics_endpoint")
        stack.callback(self._metrics_endpoint.stop)
        self.publisher = await self._start_publisher(stack)
        self.service = service = ClassificationService(
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
            max_image_bytes=settings.max_image_bytes,
        )
        stack.callback(self._forget, "service")
        stack.push_async_callback(service.stop, True)  # drains what it admitted
        if worker:
            await service.start()
            await self._bind(stack, serving=True)
        else:
            await self._bind(stack, serving=False)
            log.info("listening on %s (NOT_SERVING until the model is loaded)", self.target)
            await service.start()
            assert self.grpc is not None
            await self.grpc.set_serving(True)

    async def stop(self) -> None:
        """Graceful: NOT_SERVING, drain RPCs, stop the core, flush events. Safe to call twice."""
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.aclose()

    def _forget(self, attribute: str) -> None:
        setattr(self, attribute, None)

    async def _start_publisher(self, stack: contextlib.AsyncExitStack) -> EventPublisher | None:
        """The bus (opened here unless the caller gave one), the spool, the producer, the publisher."""
        settings = self.settings
        bus = self._bus
        if bus is None and settings.bus is not None:
            bus = await asyncio.to_thread(open_bus, settings.bus)
            stack.push_async_callback(asyncio.to_thread, bus.close)
            # Idempotent; on Kafka this is where the topic gets its partition count.
            await asyncio.to_thread(bus.create_topic, settings.bus.topic, settings.bus.partitions)
        if bus is None:
            return None
        spool = None
        if settings.spool_dir is not None:
            # Opening scans what an earlier run left to replay: disk I/O, off the loop.
            spool = await asyncio.to_thread(DiskSpool, settings.spool_dir)
            stack.callback(spool.close)
        producer = bus.producer()
        stack.push_async_callback(asyncio.to_thread, producer.close)
        publisher = EventPublisher(
            producer,
            spool=spool,
            topics={IMAGE_CLASSIFIED_TOPIC: settings.bus.topic} if settings.bus else None,
            registry=self.metrics.registry,
            metric_prefix="snaplearn_vision_events",
        )
        publisher.start()
        stack.callback(self._forget, "publisher")
        stack.push_async_callback(asyncio.to_thread, publisher.stop)
        return publisher

    async def _bind(self, stack: contextlib.AsyncExitStack, serving: bool) -> None:
        settings = self.settings
        assert self.service is not None
        self._vision_servicer = vision = VisionServicer(self.service)
        self.grpc = grpc_server = await start_grpc_server(
            [vision.register, oip.registrar(self.service)],
            [SERVICE_NAME, oip.SERVICE_NAME],
            host=settings.host,
            port=settings.port,
            serving=serving,
            max_message_bytes=settings.max_image_bytes + _MESSAGE_OVERHEAD_BYTES,
            max_connection_age_s=settings.max_connection_age_s,
            maximum_concurrent_rpcs=settings.rpc_cap(),
            max_pending_calls=settings.max_pending_calls,
            reuse_port=settings.worker_index is not None,
        )

        async def stop_serving() -> None:
            # Streams would otherwise take new items until the grace ends and then be cut with
            # items on them; ended OK, their clients resend what was not started.
            vision.drain_streams()
            await grpc_server.stop(settings.shutdown_grace_s)
            self.grpc = self._vision_servicer = None

        stack.push_async_callback(stop_serving)
