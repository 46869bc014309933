"""The core Recommend API the gRPC servicer delegates to (no gRPC, no bus).

It holds a reference to the current immutable Snapshot. The worker thread replaces it
with `publish` (a single reference assignment, atomic under the GIL); a request reads the
reference once and answers entirely from that snapshot, so it never sees a partial update
and never waits for training.
"""

from __future__ import annotations

import time
from collections.abc import Collection

from snaplearn_recommender.metrics import RecommenderMetrics
from snaplearn_recommender.snapshot import RecommendResult, Snapshot


class RecommendationService:
    def __init__(self, snapshot: Snapshot, metrics: RecommenderMetrics | None = None) -> None:
        self._snapshot = snapshot
        self._metrics = metrics
        if metrics is not None:
            metrics.watch_snapshot_age(lambda: self._snapshot.age_s())
            metrics.known_users.set(snapshot.n_users)

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    def publish(self, snapshot: Snapshot) -> None:
        """Serve `snapshot` from now on (called by the worker thread)."""
        self._snapshot = snapshot

    def recommend(
        self,
        user_id: str,
        k: int = 0,
        exclude_seen: bool = False,
        grades: Collection[int] = (),
        formats: Collection[str] = (),
        concepts: Collection[str] = (),
    ) -> RecommendResult:
        snapshot = self._snapshot  # read once: the whole answer comes from one snapshot
        started = time.perf_counter()
        result = snapshot.recommend(user_id, k, exclude_seen, grades, formats, concepts)
        if self._metrics is not None:
            elapsed = time.perf_counter() - started
            self._metrics.recommend_latency.labels(cold_start=str(result.cold_start).lower()).observe(elapsed)
        return result
