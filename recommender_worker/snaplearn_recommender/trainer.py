"""The trainer app: consumes the bus, trains, checkpoints, publishes snapshots and serves.

Roles `standalone` and `trainer` both run this app; a trainer also publishes its snapshots to
the store that query replicas (query.py) follow.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass

from snaplearn_common.eventbus.base import EventBus, TopicPartition
from snaplearn_recommender.catalog import (
    Catalog,
    check_label_mapping,
    default_label_to_concepts,
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


def restore_or_build(
    settings: RecommenderSettings, catalog: Catalog, checkpointer: Checkpointer | None
) -> tuple[RecommenderModel, Mapping[TopicPartition, int]]:
    """The checkpointed model (grown by the catalog's new items) and its offsets, or a fresh model."""
    labels = load_label_to_concepts(settings.label_map_path) if settings.label_map_path else None
    check_label_mapping(labels or default_label_to_concepts(), catalog)
    checkpoint = checkpointer.load() if checkpointer else None
    if checkpoint is None:
        return RecommenderModel(catalog, settings.model_params(), labels), {}
    model = checkpoint.model
    if model.params != settings.model_params():
        log.warning("model parameters come from the checkpoint (%s), not the command line", model.params)
    if labels is not None:
        model.label_to_concepts = dict(labels)
    new_items = [item for item in catalog if model.catalog.position(item.item_id) is None]
    if new_items:
        model.add_items(new_items)
    dropped = sum(1 for item in model.catalog if catalog.position(item.item_id) is None)
    if dropped:
        log.warning("%d checkpointed item(s) are not in the catalog; they stay recommendable", dropped)
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
        catalog = load_catalog(settings.catalog_path) if settings.catalog_path else generate_sample_catalog()
        checkpointer = Checkpointer(settings.checkpoint_dir) if settings.checkpoint_dir else None
        # Warm start / unpickling take a moment of CPU: keep the event loop responsive.
        model, offsets = await asyncio.to_thread(restore_or_build, settings, catalog, checkpointer)
        service = RecommendationService(model.snapshot(), metrics)
        worker = RecommenderWorker(
            bus, model, service.publish, settings.worker_settings(), metrics, checkpointer, offsets
        )
        metrics.watch_worker(worker.stats)
        await asyncio.to_thread(worker.start)
        spool_dir = settings.feedback_spool_dir or (
            settings.checkpoint_dir / FEEDBACK_SPOOL_SUBDIR if settings.checkpoint_dir else None
        )
        try:
            frontend = await Frontend.start(settings, bus, service, metrics, spool_dir)
        except BaseException:
            await asyncio.to_thread(worker.stop)
            raise
        publisher = None
        if store is not None:
            publisher = SnapshotPublisher(
                store, lambda: service.snapshot, settings.publish_interval_s, metrics
            )
            publisher.start()
        return cls(settings, model, worker, service, metrics, frontend, publisher)

    async def stop(self, grace_s: float = 5.0) -> None:
        """Readiness off, stop the worker (commit + checkpoint), publish its last snapshot, drain gRPC."""
        await self.frontend.set_serving(False)
        await asyncio.to_thread(self.worker.stop)
        if self.publisher is not None:
            await self.publisher.stop()
        await self.frontend.stop(grace_s)
