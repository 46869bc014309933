"""What every recommender process serves, whatever feeds its snapshots: gRPC, /metrics, RecordFeedback.

Both apps (trainer.py, query.py) build a RecommendationService and hand it here. RecordFeedback
publishes onto the topic the trainer's worker reads, so a query replica records feedback the
same way the trainer does (see feedback.py).
"""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass
from pathlib import Path

from grpc_health.v1 import health_pb2

from snaplearn_common.eventbus.base import EventBus
from snaplearn_common.metrics import MetricsEndpoint, serve_metrics
from snaplearn_common.server import GrpcServer, start_grpc_server
from snaplearn_recommender.config import RecommenderSettings
from snaplearn_recommender.feedback import FeedbackChannel
from snaplearn_recommender.metrics import RecommenderMetrics
from snaplearn_recommender.service import RecommendationService
from snaplearn_recommender.servicer import SERVICE_NAME, add_to_server


@dataclass
class Frontend:
    """The gRPC server (readiness follows the service: SERVING once it has a snapshot), the
    metrics endpoint and RecordFeedback's channel onto the bus."""

    grpc: GrpcServer
    metrics_endpoint: MetricsEndpoint
    feedback: FeedbackChannel

    @property
    def port(self) -> int:
        return self.grpc.port

    @property
    def metrics_port(self) -> int:
        return self.metrics_endpoint.port

    @classmethod
    async def start(
        cls,
        settings: RecommenderSettings,
        bus: EventBus,
        service: RecommendationService,
        metrics: RecommenderMetrics,
        feedback_spool_dir: Path | None,
    ) -> Frontend:
        """feedback_spool_dir: where unconfirmed feedback waits on disk (one process's own); None: memory."""
        worker_settings = settings.worker_settings()
        feedback = await asyncio.to_thread(
            FeedbackChannel.open,
            bus,
            lambda: service.snapshot,
            worker_settings.topic,
            worker_settings.topic_partitions,
            metrics.registry,
            feedback_spool_dir,
        )
        try:
            grpc_server = await start_grpc_server(
                [
                    functools.partial(
                        add_to_server,
                        service,
                        feedback=feedback.recorder,
                        user_ids=settings.pseudonym.user_ids(),
                    )
                ],
                [SERVICE_NAME],
                host=settings.host,
                port=settings.port,
                serving=service.has_snapshot,
                max_connection_age_s=settings.max_connection_age_s,
                security=settings.security,
            )
        except BaseException:
            await asyncio.to_thread(feedback.close)
            raise
        try:
            if not service.has_snapshot:
                # Alive (liveness and startup probes ask for "") but not ready: waiting for the
                # trainer's first snapshot is not a reason to restart the pod.
                await grpc_server.health.set("", health_pb2.HealthCheckResponse.SERVING)
            metrics_endpoint = serve_metrics(metrics.registry, host=settings.host, port=settings.metrics_port)
        except BaseException:
            await grpc_server.stop(0)
            await asyncio.to_thread(feedback.close)
            raise
        return cls(grpc_server, metrics_endpoint, feedback)

    async def set_serving(self, serving: bool) -> None:
        await self.grpc.set_serving(serving)

    async def stop(self, grace_s: float) -> None:
        """Drain gRPC, then close the feedback channel (in-flight RecordFeedback calls publish
        first), then the metrics endpoint. Readiness is the app's to turn off, earlier."""
        await self.grpc.stop(grace_s)
        await asyncio.to_thread(self.feedback.close)
        self.metrics_endpoint.stop()
