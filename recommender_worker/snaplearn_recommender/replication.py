"""The two ends of scale-out, as asyncio tasks: the trainer's publisher, a query replica's follower.

Both do their file work (pickling, hashing, writing; reading, verifying, unpickling and the
snapshot's derived arrays) on a worker thread, so the event loop keeps answering Recommend.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from snaplearn_recommender.metrics import RecommenderMetrics
from snaplearn_recommender.service import RecommendationService
from snaplearn_recommender.snapshot import Snapshot
from snaplearn_recommender.snapshot_store import SnapshotManifest, SnapshotStore, SnapshotWatcher

log = logging.getLogger(__name__)


async def _every(interval_s: float, stopping: asyncio.Event, step: Callable[[], Awaitable[object]]) -> None:
    """Run `step` now and then every `interval_s` until `stopping` is set (wakes at once on stop)."""
    while not stopping.is_set():
        await step()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), interval_s)


class SnapshotPublisher:
    """Trainer: publishes the serving snapshot when it is not the one last published.

    The worker replaces the serving snapshot after every micro-batch; publishing at most every
    `interval_s` bounds the store's write rate whatever the event rate. The first publish happens
    at start (replicas can serve the restored or cold-start model at once), the last on stop.
    """

    def __init__(
        self,
        store: SnapshotStore,
        current: Callable[[], Snapshot],
        interval_s: float,
        metrics: RecommenderMetrics | None = None,
    ) -> None:
        self.store = store
        self._current = current
        self._interval_s = interval_s
        self._metrics = metrics
        self._last: Snapshot | None = None
        self.last_manifest: SnapshotManifest | None = None
        self._lock = asyncio.Lock()  # one publish at a time: versions are numbered by the writer
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(_every(self._interval_s, self._stopping, self.publish_if_changed))

    async def publish_if_changed(self) -> SnapshotManifest | None:
        async with self._lock:
            snapshot = self._current()
            if snapshot is self._last:
                return None
            try:
                manifest = await asyncio.to_thread(self.store.publish, snapshot)
            except Exception:  # a full or unreachable volume: keep serving, try again next interval
                log.exception("publishing %s to %s failed", snapshot.version, self.store.storage.location)
                if self._metrics is not None:
                    self._metrics.snapshot_publish_failures.inc()
                return None
            self._last, self.last_manifest = snapshot, manifest
            if self._metrics is not None:
                self._metrics.snapshots_published.inc()
                self._metrics.snapshot_store_version.set(manifest.version)
            log.info(
                "published snapshot version %d (%s, %d events, %d users, %d bytes)",
                manifest.version,
                manifest.model_version,
                manifest.events_applied,
                manifest.n_users,
                manifest.size,
            )
            return manifest

    async def stop(self) -> None:
        """Stop the loop, then publish the final snapshot (call after the worker has stopped)."""
        self._stopping.set()
        if self._task is not None:
            await self._task
        await self.publish_if_changed()


class SnapshotFollower:
    """Query replica: loads each newer published snapshot into the service.

    `on_first` runs once, after the first snapshot is serving (the app turns readiness on there).
    """

    def __init__(
        self,
        store: SnapshotStore,
        service: RecommendationService,
        interval_s: float,
        metrics: RecommenderMetrics | None = None,
        on_first: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._service = service
        self._interval_s = interval_s
        self._metrics = metrics
        self._on_first = on_first
        self.watcher = SnapshotWatcher(store, self._swap_in, self._failed)
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def current(self) -> SnapshotManifest | None:
        return self.watcher.current

    def start(self) -> None:
        self._task = asyncio.create_task(_every(self._interval_s, self._stopping, self.poll))

    async def poll(self) -> SnapshotManifest | None:
        first = self.watcher.current is None
        try:
            manifest = await asyncio.to_thread(self.watcher.poll)
        except Exception:  # e.g. the shared volume is briefly unreachable: keep serving what we have
            log.exception("polling snapshot store %s failed", self.watcher.store.storage.location)
            return None
        if manifest is not None and first and self._on_first is not None:
            await self._on_first()
        return manifest

    def _swap_in(self, manifest: SnapshotManifest, snapshot: Snapshot) -> None:
        self._service.publish(snapshot)
        if self._metrics is not None:
            self._metrics.snapshots_loaded.inc()
            self._metrics.snapshot_store_version.set(manifest.version)
            self._metrics.known_users.set(snapshot.n_users)
        log.info(
            "serving snapshot version %d (%s, %d events, %d users)",
            manifest.version,
            manifest.model_version,
            manifest.events_applied,
            manifest.n_users,
        )

    def _failed(self, version: int, reason: str) -> None:
        if self._metrics is not None:
            self._metrics.snapshot_load_failures.inc()

    async def stop(self) -> None:
        self._stopping.set()
        if self._task is not None:
            await self._task
