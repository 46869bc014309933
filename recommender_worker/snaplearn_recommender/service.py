"""The core Recommend / SimilarItems API the gRPC servicer delegates to (no gRPC, no bus).

It holds a reference to the current immutable Snapshot. The worker thread replaces it
with `publish` (a single reference assignment, atomic under the GIL); a request reads the
reference once and answers entirely from that snapshot, so it never sees a partial update
and never waits for training.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Sequence

from threadpoolctl import threadpool_limits

from snaplearn_common.errors import Unavailable
from snaplearn_recommender.metrics import RecommenderMetrics
from snaplearn_recommender.snapshot import (
    FeatureFilter,
    RecommendResult,
    SimilarItemsResult,
    Snapshot,
    StudentStateResult,
)


class RecommendationService:
    """`single_threaded_blas` (default on) limits BLAS to one thread for the whole process.

    A request is one short matvec run inline on the event loop; OpenBLAS's worker threads only
    add hand-off and spinning there, and under load they compete with the event loop for the
    cores (docs/BENCHMARKS.md, recommender serving). The recommender does no other BLAS-heavy
    work (LightFM trains with its own OpenMP loops).
    """

    def __init__(
        self,
        snapshot: Snapshot | None,
        metrics: RecommenderMetrics | None = None,
        single_threaded_blas: bool = True,
    ) -> None:
        # None until a query replica loads its first published snapshot: calls get Unavailable.
        self._snapshot = snapshot
        self._metrics = metrics
        if single_threaded_blas:
            threadpool_limits(limits=1, user_api="blas")
        if metrics is not None:
            metrics.watch_snapshot_age(lambda: self._snapshot.age_s() if self._snapshot else float("nan"))
            metrics.known_users.set(snapshot.n_users if snapshot else 0)

    @property
    def snapshot(self) -> Snapshot:
        return self._current()

    @property
    def has_snapshot(self) -> bool:
        return self._snapshot is not None

    def _current(self) -> Snapshot:
        snapshot = self._snapshot
        if snapshot is None:
            raise Unavailable("no model snapshot loaded yet (the trainer has not published one); retry")
        return snapshot

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
        features: Sequence[FeatureFilter] = (),
    ) -> RecommendResult:
        snapshot = self._current()  # read once: the whole answer comes from one snapshot
        started = time.perf_counter()
        result = snapshot.recommend(user_id, k, exclude_seen, grades, formats, concepts, features)
        if self._metrics is not None:
            elapsed = time.perf_counter() - started
            self._metrics.recommend_latency.labels(cold_start=str(result.cold_start).lower()).observe(elapsed)
        return result

    def similar_items(
        self,
        item_id: str,
        k: int = 0,
        grades: Collection[int] = (),
        formats: Collection[str] = (),
        concepts: Collection[str] = (),
        features: Sequence[FeatureFilter] = (),
    ) -> SimilarItemsResult:
        return self._current().similar_items(item_id, k, grades, formats, concepts, features)

    def student_state(self, user_id: str, k: int = 0) -> StudentStateResult:
        return self._current().student_state(user_id, k)
