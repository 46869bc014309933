"""The trainer app: consumes the bus, trains, checkpoints, publishes snapshots and serves.

Roles `standalone` and `trainer` both run this app; a trainer also publishes its snapshots to
the store that query replicas (query.py) follow.

The app starts whether or not the event bus is reachable (a pod must not crash-loop while
Kafka restarts): the worker keeps trying to subscribe. Until it has, readiness is NOT_SERVING
for a fresh model, and SERVING the restored snapshot when a checkpoint was restored (its age
shows in the snapshot-age gauge).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from snaplearn_common.eventbus.base import Consumer, EventBus, Producer, TopicPartition
from snaplearn_common.eventbus.metrics import watch_embedded_bus
from snaplearn_recommender.catalog import (
    Catalog,
    check_label_mapping,
    generate_sample_catalog,
    load_catalog,
    load_label_to_concepts,
)
from snaplearn_recommender.checkpoint import Checkpointer
from snaplearn_recommender.config import RecommenderSettings
from snaplearn_recommender.frontend import Frontend
from snaplearn_recommender.metrics import RecommenderMetrics
from snaplearn_recommender.model import RecommenderModel
from snaplearn_recommender.replication import SnapshotPublisher
from snaplearn_recommender.service import RecommendationService
from snaplearn_recommender.snapshot_store import SnapshotStore, open_storage
from snaplearn_recommender.worker import RecommenderWorker

log = logging.getLogger(__name__)

FEEDBACK_SPOOL_SUBDIR = "feedback-spool"
# How long start() waits for the worker's first subscription attempt before serving anyway.
SUBSCRIBE_WAIT_S = 15.0


class _TopicsFromTheWorker(EventBus):
    """The bus as the frontend sees it: creating the worker's topic is left to the worker while
    the bus is unreachable (it creates it when it subscribes), so RecordFeedback's channel opens
    during an outage and spools until the bus is back."""

    def __init__(self, bus: EventBus, worker: RecommenderWorker) -> None:
        self._bus = bus
        self._worker = worker

    def create_topic(self, topic: str, partitions: int) -> None:
        if topic == self._worker.settings.topic and not self._worker.subscribed:
            # The worker is still trying (it creates the topic first): a second attempt here
            # would only hold up the start for a client's bootstrap timeout.
            log.info("topic %s: created by the worker once the event bus is reachable", topic)
            return
        self._bus.create_topic(topic, partitions)

    def partitions_for(self, topic: str) -> int:
        return self._bus.partitions_for(topic)

    def producer(self) -> Producer:
        return self._bus.producer()

    def consumer(self, group_id: str, topics: Sequence[str], *, instance_id: str | None = None) -> Consumer:
        return self._bus.consumer(group_id, topics, instance_id=instance_id)

    def close(self) -> None:
        """The app's bus is closed by its owner (main), not through this view."""


def restore_or_build(
    settings: RecommenderSettings, catalog: Catalog, checkpointer: Checkpointer | None
) -> tuple[RecommenderModel, Mapping[TopicPartition, int]]:
    """The checkpointed model (grown by the catalog's new items) and its offsets, or a fresh model."""
    labels = load_label_to_concepts(settings.label_map_path) if settings.label_map_path else None
    check_label_mapping(labels, catalog)  # only a mapping the user gave can be their mistake
    checkpoint = checkpointer.load() if checkpointer else None
    if checkpoint is None:
        return RecommenderModel(catalog, settings.model_params(), labels), {}
    model = checkpoint.model
    model.use_settings(settings.model_params())  # practise band, threshold, ...: the current ones
    if model.params != settings.model_params():
        log.warning("model parameters come from the checkpoint (%s), not the command line", model.params)
    if labels is not None:
        model.label_to_concepts = dict(labels)
    # The catalog given now is the truth: checkpointed items it lacks are retired (never recommended).
    changes = model.sync_catalog(catalog)
    if changes:
        log.info(
            "catalog against the checkpoint: %d added, %d changed, %d retired",
            len(changes.added),
            len(changes.changed),
            len(changes.retired),
        )
    log.info("restored checkpoint: %d events applied, %d users", model.events_applied, model.n_users)
    return model, checkpoint.offsets


@dataclass
class TrainerApp:
    """The model's only writer (the worker thread) and a frontend serving its latest snapshot."""

    settings: RecommenderSettings
    model: RecommenderModel
    worker: RecommenderWorker
    service: RecommendationService
    metrics: RecommenderMetrics
    frontend: Frontend
    # None when there is no snapshot store to publish to (role standalone).
    publisher: SnapshotPublisher | None
    readiness: asyncio.Task[None] | None = field(default=None)

    @property
    def port(self) -> int:
        return self.frontend.port

    @property
    def metrics_port(self) -> int:
        return self.frontend.metrics_port

    @classmethod
    async def start(cls, settings: RecommenderSettings, bus: EventBus) -> TrainerApp:
        store = None
        if settings.role == "trainer":
            if settings.snapshot_dir is None:  # the settings refuse this; the type does not know
                raise ValueError("a trainer needs a snapshot directory")
            store = SnapshotStore(open_storage(settings.snapshot_dir), settings.snapshot_retain)
        metrics = RecommenderMetrics()
        catalog = (
            load_catalog(
                settings.catalog_path,
                settings.catalog_features_path,
                settings.catalog_feature_specs(),
                settings.catalog_item_columns(),
            )
            if settings.catalog_path
            else generate_sample_catalog()
        )
        checkpointer = Checkpointer(settings.checkpoint_dir) if settings.checkpoint_dir else None
        # Warm start / unpickling take a moment of CPU: keep the event loop responsive.
        model, offsets = await asyncio.to_thread(restore_or_build, settings, catalog, checkpointer)
        service = RecommendationService(model.snapshot(), metrics)
        worker = RecommenderWorker(
            bus, model, service.publish, settings.worker_settings(), metrics, checkpointer, offsets
        )
        metrics.watch_worker(worker.stats)
        watch_embedded_bus(bus, metrics.registry)  # the embedded log's size and oldest offsets
        restored = checkpointer is not None and bool(offsets)
        await asyncio.to_thread(worker.start, SUBSCRIBE_WAIT_S)
        if not worker.subscribed:
            log.warning(
                "waiting for the event bus (%s) to subscribe to %s; %s meanwhile",
                settings.bus.kafka_bootstrap_servers if settings.bus.backend == "kafka" else "embedded",
                settings.bus.topic,
                "serving the restored checkpoint (stale)" if restored else "NOT_SERVING",
            )
        spool_dir = settings.feedback_spool_dir or (
            settings.checkpoint_dir / FEEDBACK_SPOOL_SUBDIR if settings.checkpoint_dir else None
        )
        try:
            frontend = await Frontend.start(
                settings, _TopicsFromTheWorker(bus, worker), service, metrics, spool_dir
            )
        except BaseException:
            await asyncio.to_thread(worker.stop)
            raise
        readiness = None
        if not worker.subscribed and not restored:
            await frontend.set_serving(False)
            readiness = asyncio.create_task(_serve_once_subscribed(worker, frontend))
        publisher = None
        if store is not None:
            publisher = SnapshotPublisher(
                store, lambda: service.snapshot, settings.publish_interval_s, metrics
            )
            publisher.start()
        return cls(settings, model, worker, service, metrics, frontend, publisher, readiness)

    async def stop(self, grace_s: float = 5.0) -> None:
        """Readiness off, stop the worker (commit + checkpoint), publish its last snapshot, drain gRPC."""
        if self.readiness is not None:
            self.readiness.cancel()
        await self.frontend.set_serving(False)
        await asyncio.to_thread(self.worker.stop)
        if self.publisher is not None:
            await self.publisher.stop()
        await self.frontend.stop(grace_s)


async def _serve_once_subscribed(worker: RecommenderWorker, frontend: Frontend) -> None:
    """Readiness on once the worker has subscribed (its thread sets an asyncio.Event on this loop)."""
    loop = asyncio.get_running_loop()
    subscribed = asyncio.Event()
    worker.on_subscribed = lambda: loop.call_soon_threadsafe(subscribed.set)
    if not worker.subscribed:  # it may have subscribed before the callback was set
        await subscribed.wait()
    log.info("event bus reachable: the worker subscribed; SERVING")
    await frontend.set_serving(True)
