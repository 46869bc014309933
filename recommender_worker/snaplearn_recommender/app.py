"""Assembles the recommender (catalog, model or checkpoint, worker thread, gRPC, metrics) on an open bus."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Mapping
from dataclasses import dataclass

from snaplearn_common.eventbus.base import EventBus, TopicPartition
from snaplearn_common.metrics import MetricsEndpoint, serve_metrics
from snaplearn_common.server import GrpcServer, start_grpc_server
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
from snaplearn_recommender.feedback import FeedbackChannel
from snaplearn_recommender.metrics import RecommenderMetrics
from snaplearn_recommender.model import RecommenderModel
from snaplearn_recommender.service import RecommendationService
from snaplearn_recommender.servicer import SERVICE_NAME, add_to_server
from snaplearn_recommender.worker import RecommenderWorker

log = logging.getLogger(__name__)


def _restore_or_build(
    settings: RecommenderSettings, catalog: Catalog, checkpointer: Checkpointer | None
) -> tuple[RecommenderModel, Mapping[TopicPartition, int]]:
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
class RecommenderApp:
    settings: RecommenderSettings
    model: RecommenderModel
    service: RecommendationService
    worker: RecommenderWorker
    metrics: RecommenderMetrics
    grpc: GrpcServer
    metrics_endpoint: MetricsEndpoint
    feedback: FeedbackChannel | None = None  # RecordFeedback's publisher (every role)

    @property
    def port(self) -> int:
        return self.grpc.port

    @property
    def metrics_port(self) -> int:
        return self.metrics_endpoint.port

    @classmethod
    async def start(cls, settings: RecommenderSettings, bus: EventBus) -> RecommenderApp:
        catalog = load_catalog(settings.catalog_path) if settings.catalog_path else generate_sample_catalog()
        checkpointer = Checkpointer(settings.checkpoint_dir) if settings.checkpoint_dir else None
        # Warm start / unpickling take a moment of CPU: keep the event loop responsive.
        model, offsets = await asyncio.to_thread(_restore_or_build, settings, catalog, checkpointer)
        metrics = RecommenderMetrics()
        service = RecommendationService(model.snapshot(), metrics)
        worker = RecommenderWorker(
            bus, model, service.publish, settings.worker_settings(), metrics, checkpointer, offsets
        )
        metrics.watch_worker(worker.stats)
        await asyncio.to_thread(worker.start)
        # RecordFeedback publishes onto the topic the (trainer's) worker reads. A query replica keeps
        # unconfirmed feedback in memory: a spool directory is one process's, and it has none.
        worker_settings = settings.worker_settings()
        spool_dir = (
            settings.checkpoint_dir / "feedback-spool"
            if settings.checkpoint_dir and model is not None
            else None
        )
        feedback = await asyncio.to_thread(
            FeedbackChannel.open,
            bus,
            lambda: service.snapshot,
            worker_settings.topic,
            worker_settings.topic_partitions,
            metrics.registry,
            spool_dir,
        )
        try:
            grpc_server = await start_grpc_server(
                [functools.partial(add_to_server, service, feedback=feedback.recorder)],
                [SERVICE_NAME],
                host=settings.host,
                port=settings.port,
            )
        except BaseException:
            await asyncio.to_thread(worker.stop)
            await asyncio.to_thread(feedback.close)
            raise
        metrics_endpoint = serve_metrics(metrics.registry, host=settings.host, port=settings.metrics_port)
        app = cls(settings, model, service, worker, metrics, grpc_server, metrics_endpoint)
        app.feedback = feedback
        return app

    async def stop(self, grace_s: float = 5.0) -> None:
        """Readiness off, then stop the worker (commit + checkpoint), then drain gRPC."""
        await self.grpc.set_serving(False)
        await asyncio.to_thread(self.worker.stop)
        await self.grpc.stop(grace_s)
        if self.feedback is not None:  # after the drain: in-flight RecordFeedback calls publish first
            await asyncio.to_thread(self.feedback.close)
        self.metrics_endpoint.stop()
