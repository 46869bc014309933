"""The query app: serves the newest snapshot the trainer published; no consumer, no training,
no checkpoints. Stateless, so it scales out behind a load balancer.

Until the first snapshot loads, calls get UNAVAILABLE and readiness stays NOT_SERVING.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from snaplearn_common.eventbus.base import EventBus
from snaplearn_recommender.config import RecommenderSettings
from snaplearn_recommender.frontend import Frontend
from snaplearn_recommender.metrics import RecommenderMetrics
from snaplearn_recommender.replication import SnapshotFollower
from snaplearn_recommender.service import RecommendationService
from snaplearn_recommender.snapshot_store import SnapshotStore, open_storage


@dataclass
class QueryApp:
    """A snapshot follower feeding the service, and the same frontend as the trainer's."""

    settings: RecommenderSettings
    service: RecommendationService
    metrics: RecommenderMetrics
    frontend: Frontend
    follower: SnapshotFollower

    @property
    def port(self) -> int:
        return self.frontend.port

    @property
    def metrics_port(self) -> int:
        return self.frontend.metrics_port

    @classmethod
    async def start(cls, settings: RecommenderSettings, bus: EventBus) -> QueryApp:
        """bus: where RecordFeedback publishes (the trainer consumes it); nothing here consumes."""
        if settings.snapshot_dir is None:  # the settings refuse this; the type does not know
            raise ValueError("a query replica needs a snapshot directory")
        store = SnapshotStore(open_storage(settings.snapshot_dir), settings.snapshot_retain)
        metrics = RecommenderMetrics()
        service = RecommendationService(None, metrics)
        # A spool directory is one process's own: a replica spools only where it is given one,
        # otherwise it keeps unconfirmed feedback in memory.
        frontend = await Frontend.start(settings, bus, service, metrics, settings.feedback_spool_dir)
        follower = SnapshotFollower(
            store,
            service,
            settings.poll_interval_s,
            metrics,
            on_first=functools.partial(frontend.set_serving, True),
        )
        follower.start()
        return cls(settings, service, metrics, frontend, follower)

    async def stop(self, grace_s: float = 5.0) -> None:
        """Readiness off, stop following, drain gRPC."""
        await self.frontend.set_serving(False)
        await self.follower.stop()
        await self.frontend.stop(grace_s)
