"""Assembles the recommender (catalog, model or checkpoint, worker thread, gRPC, metrics) on an open bus."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Mapping
from dataclasses import dataclass

from grpc_health.v1 import health_pb2

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
from snaplearn_recommender.replication import SnapshotFollower, SnapshotPublisher
from snaplearn_recommender.service import RecommendationService
from snaplearn_recommender.servicer import SERVICE_NAME, add_to_server
from snaplearn_recommender.snapshot_store import SnapshotStore, open_storage
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
    """Role standalone: worker + gRPC; trainer: also a snapshot publisher; query: a snapshot
    follower instead of model and worker (no consumer, no training, no checkpoints)."""

    settings: RecommenderSettings
    model: RecommenderModel | None  # None in a query replica
    service: RecommendationService
    worker: RecommenderWorker | None  # None in a query replica
    metrics: RecommenderMetrics
    grpc: GrpcServer
    metrics_endpoint: MetricsEndpoint
    publisher: SnapshotPublisher | None = None  # trainer
    follower: SnapshotFollower | None = None  # query replica
    feedback: FeedbackChannel | None = None  # RecordFeedback's publisher (every role)

    @property
    def port(self) -> int:
        return self.grpc.port

    @property
    def metrics_port(self) -> int:
        return self.metrics_endpoint.port

    @classmethod
    async def start(cls, settings: RecommenderSettings, bus: EventBus) -> RecommenderApp:
        metrics = RecommenderMetrics()
        model: RecommenderModel | None = None
        worker: RecommenderWorker | None = None
        if settings.role == "query":
            # Nothing to serve until the first published snapshot loads: calls get UNAVAILABLE and
            # readiness stays NOT_SERVING until then (SnapshotFollower's on_first).
            service = RecommendationService(None, metrics)
        else:
            catalog = (
                load_catalog(settings.catalog_path) if settings.catalog_path else generate_sample_catalog()
            )
            checkpointer = Checkpointer(settings.checkpoint_dir) if settings.checkpoint_dir else None
            # Warm start / unpickling take a moment of CPU: keep the event loop responsive.
            trained, offsets = await asyncio.to_thread(_restore_or_build, settings, catalog, checkpointer)
            model = trained
            service = RecommendationService(trained.snapshot(), metrics)
            worker = RecommenderWorker(
                bus, trained, service.publish, settings.worker_settings(), metrics, checkpointer, offsets
            )
            metrics.watch_worker(worker.stats)
            await asyncio.to_thread(worker.start)
        # RecordFeedback publishes onto the topic the (trainer's) worker reads. A spool directory
        # is one process's own: a query replica spools only where it is given one (--feedback-spool-dir),
        # otherwise it keeps unconfirmed feedback in memory.
        worker_settings = settings.worker_settings()
        spool_dir = settings.feedback_spool_dir or (
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
                serving=service.has_snapshot,
                max_connection_age_s=settings.max_connection_age_s,
            )
        except BaseException:
            if worker is not None:
                await asyncio.to_thread(worker.stop)
            await asyncio.to_thread(feedback.close)
            raise
        if not service.has_snapshot:
            # Alive (liveness and startup probes ask for "") but not ready: waiting for the trainer
            # is not a reason to restart the pod.
            await grpc_server.health.set("", health_pb2.HealthCheckResponse.SERVING)
        metrics_endpoint = serve_metrics(metrics.registry, host=settings.host, port=settings.metrics_port)
        app = cls(settings, model, service, worker, metrics, grpc_server, metrics_endpoint)
        app.feedback = feedback
        app._start_scale_out()
        return app

    def _start_scale_out(self) -> None:
        """Trainer: publish snapshots; query replica: follow them (see replication.py)."""
        if self.settings.snapshot_dir is None or self.settings.role == "standalone":
            return
        store = SnapshotStore(open_storage(self.settings.snapshot_dir), self.settings.snapshot_retain)
        if self.settings.role == "trainer":
            service = self.service
            self.publisher = SnapshotPublisher(
                store, lambda: service.snapshot, self.settings.publish_interval_s, self.metrics
            )
            self.publisher.start()
        else:
            self.follower = SnapshotFollower(
                store,
                self.service,
                self.settings.poll_interval_s,
                self.metrics,
                on_first=functools.partial(self.grpc.set_serving, True),
            )
            self.follower.start()

    async def stop(self, grace_s: float = 5.0) -> None:
        """Readiness off, then stop the worker (commit + checkpoint) and publish its last snapshot
        (trainer) or stop following (query replica), then drain gRPC."""
        await self.grpc.set_serving(False)
        if self.follower is not None:
            await self.follower.stop()
        if self.worker is not None:
            await asyncio.to_thread(self.worker.stop)
        if self.publisher is not None:
            await self.publisher.stop()
        await self.grpc.stop(grace_s)
        if self.feedback is not None:  # after the drain: in-flight RecordFeedback calls publish first
            await asyncio.to_thread(self.feedback.close)
        self.metrics_endpoint.stop()
