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
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from grpc_health.v1 import health_pb2

from snaplearn_common.eventbus.base import EventBus
from snaplearn_common.eventbus.factory import open_bus
from snaplearn_common.eventbus.publisher import EventPublisher
from snaplearn_common.eventbus.spool import DiskSpool
from snaplearn_common.events import IMAGE_CLASSIFIED_TOPIC
from snaplearn_common.metrics import MetricsEndpoint, serve_metrics
from snaplearn_common.pseudonym import pseudonymising_sink
from snaplearn_common.server import GrpcServer, start_grpc_server
from snaplearn_vision.config import VisionSettings
from snaplearn_vision.core.metrics import VisionMetrics
from snaplearn_vision.core.service import ClassificationService, LoadedModel, ModelCatalog, ModelSource
from snaplearn_vision.core.versions import VersionPolicy
from snaplearn_vision.edges import oip
from snaplearn_vision.edges.vision import SERVICE_NAME, VisionServicer
from snaplearn_vision.schema import (
    CONFIG_FILENAME,
    NAME_PATTERN,
    VERSION_PATTERN,
    BatchingOverrides,
    DeviceChoice,
    InvalidModelConfig,
    Precision,
)

log = logging.getLogger(__name__)

# Room for the other ClassifyRequest fields around the largest accepted image, so that an
# oversized image gets our INVALID_ARGUMENT message rather than gRPC's RESOURCE_EXHAUSTED.
_MESSAGE_OVERHEAD_BYTES = 64 * 1024
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


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

    def release(self) -> None:
        """Give the CUDA caching allocator's freed blocks back after a version was dropped."""
        torch = sys.modules.get("torch")  # loaded with the first model; never imported here first
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()


@dataclass(frozen=True)
class RepositoryCatalog:
    """A ModelCatalog over the on-disk repository: `<root>/<name>/<version>/config.json` per version,
    and an optional model-level `<root>/<name>/config.json` holding the version policy.

    Read without torch: listing runs on every poll.
    """

    root: Path

    def model_names(self) -> list[str]:
        try:
            entries = sorted(os.scandir(self.root), key=lambda entry: entry.name)
        except OSError:
            return []
        return [e.name for e in entries if NAME_PATTERN.match(e.name) and self.versions(e.name)]

    def versions(self, name: str) -> list[str]:
        if not NAME_PATTERN.match(name):
            return []
        try:
            entries = list(os.scandir(self.root / name))
        except OSError:
            return []
        found = [
            e.name
            for e in entries
            if VERSION_PATTERN.match(e.name) and os.path.isfile(os.path.join(e.path, CONFIG_FILENAME))
        ]
        return sorted(found, key=int)

    def policy(self, name: str) -> VersionPolicy:
        path = self.root / name / CONFIG_FILENAME
        try:
            text = path.read_text()
        except FileNotFoundError:
            return VersionPolicy()
        except OSError as error:
            raise InvalidModelConfig(f"cannot read {path}: {error.strerror}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise InvalidModelConfig(f"{path} is not valid JSON: {error}") from None
        if not isinstance(data, dict):
            raise InvalidModelConfig(f"{path} must hold a JSON object")
        try:
            return VersionPolicy.from_config(data)
        except InvalidModelConfig as error:
            raise InvalidModelConfig(f"{path}: {error}") from None

    def stamp(self, name: str, version: str) -> object:
        """Changes when the version directory is written again (a new directory renamed into place)."""
        try:
            directory = os.stat(self.root / name / version)
            config = os.stat(self.root / name / version / CONFIG_FILENAME)
        except OSError:
            return None
        return (directory.st_ino, directory.st_mtime_ns, config.st_ino, config.st_mtime_ns)

    def public_reason(self, error: BaseException) -> str:
        """The error's message with repository paths made relative: callers never see server paths."""
        text = str(error) or type(error).__name__
        for root in {str(self.root.resolve()), str(self.root), os.path.abspath(self.root)}:
            text = text.replace(root + os.sep, "").replace(root, "<repository>")
        if not isinstance(error, (InvalidModelConfig, RuntimeError, ValueError, OSError)):
            text = f"{type(error).__name__}: {text}"
        return text


def model_health_name(model: str) -> str:
    """The health service name that says whether `model` serves (gRPC health, one per loaded model)."""
    return f"{oip.SERVICE_NAME}/{model}"


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
        self._catalog: ModelCatalog = RepositoryCatalog(Path(settings.model_repository))
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
            catalog=self._catalog,
            model_poll_interval_s=settings.model_poll_interval_s,
            default_model_name=settings.model_name,
            default_model_version=settings.model_version or None,
            publisher=pseudonymising_sink(self.publisher, settings.pseudonym.user_ids()),
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
            security=settings.security,
        )

        models_health = _ModelHealth(grpc_server)
        self.service.add_model_listener(models_health.changed)
        for name in {row.name for row in self.service.repository_index(ready_only=True)}:
            models_health.changed(name, True)  # a worker loads before it binds

        async def stop_serving() -> None:
            # Streams would otherwise take new items until the grace ends and then be cut with
            # items on them; ended OK, their clients resend what was not started.
            vision.drain_streams()
            await models_health.stop()
            await grpc_server.stop(settings.shutdown_grace_s)
            self.grpc = self._vision_servicer = None

        stack.push_async_callback(stop_serving)


class _ModelHealth:
    """Per-model readiness in the gRPC health service (model_health_name), kept by the core's listener."""

    def __init__(self, grpc_server: GrpcServer) -> None:
        self._grpc = grpc_server
        self._names: set[str] = set()
        self._updates: set[asyncio.Task[None]] = set()

    def changed(self, name: str, ready: bool) -> None:
        self._names.add(name)
        status = (
            health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        task = asyncio.get_running_loop().create_task(self._grpc.health.set(model_health_name(name), status))
        self._updates.add(task)
        task.add_done_callback(self._updates.discard)

    async def stop(self) -> None:
        """Every model NOT_SERVING before the server drains, as the server's own entries go."""
        if self._updates:
            await asyncio.gather(*self._updates, return_exceptions=True)
        for name in sorted(self._names):
            await self._grpc.health.set(model_health_name(name), _NOT_SERVING)
