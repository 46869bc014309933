"""What engagement feedback costs: apply throughput and Recommend latency, side by side in one run.

    python benchmarks/recommender_feedback.py [--events 10000] [--items 100000] [--repeats 3]

(a) events/s into the model (model.apply + a snapshot per batch of 256, as the worker does) on
    the sample catalog for the same number of events: photos only, half photos / half feedback
    (completed, viewed, skipped in equal parts), feedback only. Median of --repeats runs.
(b) Snapshot.recommend (k=20, BLAS single-threaded as the service sets it) over --items
    synthetic items, for users without skips and users with 20 skipped items, with and without
    exclude_seen: the skip exclusion is one np.union1d of two small sorted arrays per request.
Prints a table; timings on a shared machine are noisy: compare rows of one run, not runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recommender_serving import big_catalog

from snaplearn_common.events import FeedbackKind
from snaplearn_recommender.bench import synthetic_events
from snaplearn_recommender.catalog import Catalog, generate_sample_catalog
from snaplearn_recommender.model import ClassifiedEvent, FeedbackEvent, ModelEvent, RecommenderModel

BATCH = 256
K = 20
KINDS = (FeedbackKind.COMPLETED, FeedbackKind.VIEWED, FeedbackKind.SKIPPED)


def feedback_events(count: int, users: int, catalog: Catalog, seed: int = 1) -> list[FeedbackEvent]:
    rng = np.random.default_rng(seed)
    items = rng.integers(len(catalog), size=count)
    return [
        FeedbackEvent(
            f"f{n}",
            f"user-{int(rng.integers(users))}",
            catalog[int(items[n])].item_id,
            KINDS[n % 3],
            1.7e9 + n,
        )
        for n in range(count)
    ]


def mixed(photos: list[ClassifiedEvent], feedback: list[FeedbackEvent], share: float) -> list[ModelEvent]:
    """len(photos) events, `share` of them feedback, interleaved evenly."""
    step = round(1 / share) if share else 0
    return [feedback[n] if step and n % step == 0 else photos[n] for n in range(len(photos))]


def apply_rate(events: list[ModelEvent], catalog: Catalog) -> float:
    model = RecommenderModel(catalog)
    started = time.perf_counter()
    for first in range(0, len(events), BATCH):
        model.apply(events[first : first + BATCH])
        model.snapshot()
    return len(events) / (time.perf_counter() - started)


def latency_us(
    model: RecommenderModel, users: list[str], requests: int, **kwargs: object
) -> tuple[float, float]:
    snapshot = model.snapshot()
    times = np.empty(requests)
    for i in range(requests):
        started = time.perf_counter()
        snapshot.recommend(users[i % len(users)], k=K, **kwargs)  # type: ignore[arg-type]
        times[i] = time.perf_counter() - started
    p50, p99 = np.percentile(times, [50, 99]) * 1e6
    return float(p50), float(p99)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--users", type=int, default=1_000)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=2_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    threadpool_limits(limits=1, user_api="blas")

    sample = generate_sample_catalog()
    photos = synthetic_events(args.events, args.users)
    feedback = feedback_events(args.events, args.users, sample)
    print(f"(a) events/s into the model, {args.events} events, batches of {BATCH}, median of {args.repeats}")
    rates = {}
    for name, share in (("photos only", 0.0), ("1/2 feedback", 0.5), ("feedback only", 1.0)):
        events = mixed(photos, feedback, share) if share < 1 else list(feedback)
        rates[name] = statistics.median(apply_rate(events, sample) for _ in range(args.repeats))
        print(f"    {name:<14} {rates[name]:>9,.0f} events/s   x{rates[name] / rates['photos only']:.2f}")

    catalog = big_catalog(args.items)
    model = RecommenderModel(catalog)
    users = [f"user-{u}" for u in range(200)]
    model.apply(
        [ClassifiedEvent(f"p{u}", user, (("fractions", 0.9),), 1.7e9) for u, user in enumerate(users)]
    )
    skippers = users[100:]
    rng = np.random.default_rng(2)
    model.apply(
        [
            FeedbackEvent(f"s{u}-{j}", user, catalog[int(p)].item_id, FeedbackKind.SKIPPED, 1.7e9 + 1)
            for u, user in enumerate(skippers)
            for j, p in enumerate(rng.choice(len(catalog), 20, replace=False))
        ]
    )
    print(f"(b) Snapshot.recommend k={K}, {args.items} items, {args.requests} requests: p50 / p99 us")
    base = None
    for name, who, kwargs in (
        ("no skips", users[:100], {}),
        ("20 skips", skippers, {}),
        ("no skips, exclude_seen", users[:100], {"exclude_seen": True}),
        ("20 skips, exclude_seen", skippers, {"exclude_seen": True}),
    ):
        p50, p99 = latency_us(model, who, args.requests, **kwargs)
        base = base or p50
        print(f"    {name:<24} {p50:>7.0f} / {p99:>7.0f}   p50 x{p50 / base:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
