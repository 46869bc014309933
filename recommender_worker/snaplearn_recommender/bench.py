"""Micro-benchmark: `python -m snaplearn_recommender.bench [--events N] [--users U] [--batch B]`.

Measures events/s applied into the model (model.apply + snapshot build, as the worker does
per micro-batch) and Recommend latency (core API, one snapshot) on the sample catalog.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import numpy as np

from snaplearn_common.topics import DEFAULT_TOPICS
from snaplearn_recommender.catalog import generate_sample_catalog
from snaplearn_recommender.model import ClassifiedEvent, RecommenderModel
from snaplearn_recommender.service import RecommendationService


def synthetic_events(count: int, users: int, seed: int = 0) -> list[ClassifiedEvent]:
    rng = np.random.default_rng(seed)
    favourite = rng.integers(len(DEFAULT_TOPICS), size=users)
    events = []
    for number in range(count):
        user = int(rng.integers(users))
        topic = DEFAULT_TOPICS[int(favourite[user])] if rng.random() < 0.8 else rng.choice(DEFAULT_TOPICS)
        other = DEFAULT_TOPICS[int(rng.integers(len(DEFAULT_TOPICS)))]
        labels = ((str(topic), 0.8), (other, 0.15))
        events.append(ClassifiedEvent(f"e{number}", f"user-{user}", labels, 1_700_000_000.0 + number))
    return events


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--users", type=int, default=2_000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--requests", type=int, default=5_000)
    args = parser.parse_args(argv)

    model = RecommenderModel(generate_sample_catalog())
    events = synthetic_events(args.events, args.users)
    started = time.perf_counter()
    apply_s = 0.0
    for first in range(0, len(events), args.batch):
        batch_started = time.perf_counter()
        model.apply(events[first : first + args.batch])
        apply_s += time.perf_counter() - batch_started
        snapshot = model.snapshot()
    total_s = time.perf_counter() - started
    print(
        f"applied {len(events)} events ({model.n_users} users) in batches of {args.batch}: "
        f"{len(events) / total_s:,.0f} events/s incl. snapshot builds, "
        f"{len(events) / apply_s:,.0f} events/s apply only"
    )

    service = RecommendationService(snapshot)
    users = [f"user-{i}" for i in range(args.users)]
    latencies = np.empty(args.requests)
    cpu_times = np.empty(args.requests)  # thread CPU time: excludes preemption by other processes
    for i in range(args.requests):
        request_started, cpu_started = time.perf_counter(), time.thread_time()
        service.recommend(users[i % len(users)], k=10, exclude_seen=i % 2 == 0)
        latencies[i] = time.perf_counter() - request_started
        cpu_times[i] = time.thread_time() - cpu_started
    p50, p99 = np.percentile(latencies, [50, 99]) * 1e6
    cpu_p50, cpu_p99 = np.percentile(cpu_times, [50, 99]) * 1e6
    print(
        f"Recommend (core, k=10, {len(snapshot.catalog)} items): wall p50 {p50:.0f} us, p99 {p99:.0f} us; "
        f"CPU p50 {cpu_p50:.0f} us, p99 {cpu_p99:.0f} us"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
