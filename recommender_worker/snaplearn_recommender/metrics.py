"""The recommender's Prometheus metrics, on a registry of its own (see snaplearn_common.metrics)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from snaplearn_common.metrics import LATENCY_BUCKETS

# Worker counters read at scrape time from WorkerStats (the worker thread owns them; no locking
# needed for monotonically increasing ints read by another thread).
WORKER_COUNTERS = {
    "dead_lettered": "Undecodable or unknown-version records sent to the dead-letter topic",
    "redelivered": "Records below the model's position, skipped (already applied before a restart)",
    "rewinds": "Seeks back to the model's position after the fetch position jumped ahead",
    "checkpoints": "Checkpoints of model + offsets written",
    "commit_failures": "Offset commits that failed (the checkpoint still holds the offsets)",
    "records_consumed": "Records read from the topic",
    "commits_skipped": "Offset commits not tried while the event bus was unreachable",
    "bus_outages": "Times the event bus became unreachable for the worker (at start included)",
    "bus_outage_seconds": "Seconds of event bus outages that have ended",
}

BATCH_SIZE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
PREFIX = "snaplearn_recommender"


class RecommenderMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.recommend_latency = Histogram(
            f"{PREFIX}_recommend_latency_seconds",
            "Time to answer one Recommend from the current snapshot",
            ["cold_start"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.events_applied = Counter(
            f"{PREFIX}_events_applied", "ImageClassified events applied to the model", registry=r
        )
        self.duplicate_events = Counter(
            f"{PREFIX}_duplicate_events",
            "Events skipped because their event_id was already applied",
            registry=r,
        )
        self.malformed_events = Counter(
            f"{PREFIX}_malformed_events",
            "Records on the topic that could not be decoded (skipped)",
            registry=r,
        )
        self.failed_batches = Counter(
            f"{PREFIX}_failed_batches", "Micro-batches whose model update raised (skipped)", registry=r
        )
        self.batch_size = Histogram(
            f"{PREFIX}_microbatch_records", "Records per micro-batch", buckets=BATCH_SIZE_BUCKETS, registry=r
        )
        self.batch_duration = Histogram(
            f"{PREFIX}_microbatch_duration_seconds",
            "Decode + model update + snapshot build + commit, per micro-batch",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.snapshot_age = Gauge(
            f"{PREFIX}_snapshot_age_seconds",
            "Seconds since the serving snapshot was built (grows while no events arrive; read with the lag)",
            registry=r,
        )
        self.consumer_lag = Gauge(
            f"{PREFIX}_consumer_lag_records",
            "Records on the topic not yet applied (after the last batch)",
            registry=r,
        )
        self.known_users = Gauge(f"{PREFIX}_known_users", "Users in the serving snapshot", registry=r)
        # Scale-out (snapshot_store.py): the trainer publishes, query replicas load.
        self.snapshot_store_version = Gauge(
            f"{PREFIX}_snapshot_store_version",
            "Store version of the snapshot last published (trainer) or serving (query replica); 0: none",
            registry=r,
        )
        self.snapshots_published = Counter(
            f"{PREFIX}_snapshots_published", "Snapshots written to the snapshot store", registry=r
        )
        self.snapshot_publish_failures = Counter(
            f"{PREFIX}_snapshot_publish_failures", "Snapshot publishes that failed (retried)", registry=r
        )
        self.snapshots_loaded = Counter(
            f"{PREFIX}_snapshots_loaded", "Snapshots loaded from the store (query replica)", registry=r
        )
        self.snapshot_load_failures = Counter(
            f"{PREFIX}_snapshot_load_failures",
            "Snapshot versions skipped as corrupt or partial (the previous one kept serving)",
            registry=r,
        )

    def watch_snapshot_age(self, age_s: Callable[[], float]) -> None:
        """Compute the age at scrape time, so it is right even when no batch runs."""
        self.snapshot_age.set_function(age_s)

    def watch_worker(self, stats: Any) -> None:
        """Export the worker's WorkerStats counters, read at scrape time."""
        self.registry.register(_WorkerStatsCollector(stats))


class _WorkerStatsCollector(Collector):
    def __init__(self, stats: Any) -> None:
        self._stats = stats

    def collect(self) -> Iterator[CounterMetricFamily]:
        values = dataclasses.asdict(self._stats)
        for name, help_text in WORKER_COUNTERS.items():
            yield CounterMetricFamily(f"{PREFIX}_worker_{name}", help_text, value=values[name])
