"""Cost of a live catalog change and of feature filters (DECISIONS D41, D42).

    python benchmarks/catalog_live.py [--items N] [--repeat R] [--freshness N]

Builds the serving benchmark's synthetic catalog (snaplearn_bench.recommender_serving.big_catalog),
then times, in this process: one CatalogItemAdded applied plus the snapshot that follows it (what
the worker does per batch), and a cold Recommend without a filter, with the grade / format fields
and with declared-feature filters. Medians of R runs; numbers depend on the machine.

--freshness N: also time N catalog additions, changes and retirements into Recommend, with the probes of
the freshness benchmark (snaplearn_bench.freshness: a recommender process on the sample catalog,
each change published as the sync command does, timed from the publish returning to the first
Recommend over gRPC that returns the new / changed item, or no longer returns the retired one; p50 / p95 /
max). `python benchmarks/bus_freshness.py` measures the same beside photos and answers, on both
buses; --freshness-bus kafka runs these on a broker of its own (scripts/kafka.sh).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

from snaplearn_bench.bus_freshness import catalog_freshness
from snaplearn_bench.freshness import PATHS, Summary
from snaplearn_bench.recommender_serving import big_catalog
from snaplearn_recommender.catalog import LearningItem
from snaplearn_recommender.model import CatalogChange, RecommenderModel
from snaplearn_recommender.snapshot import FeatureFilter


def _median_s(run: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--freshness", type=int, default=0, metavar="N")
    parser.add_argument("--freshness-bus", choices=("embedded", "kafka"), default="embedded")
    args = parser.parse_args()
    model = RecommenderModel(big_catalog(args.items))
    model.snapshot()
    count = iter(range(10**9))

    def change() -> None:
        number = next(count)
        item = LearningItem(f"new-{number}", f"New {number}", ("fractions",), features={"topic": ("Food",)})
        model.apply([CatalogChange(f"c-{number}", "added", item.item_id, item)])
        model.snapshot()

    print(f"catalog of {args.items} items")
    print(
        f"one catalog change applied + snapshot: {_median_s(change, max(3, args.repeat // 20)) * 1e3:.1f} ms"
    )
    snapshot = model.snapshot()
    cases: dict[str, dict[str, object]] = {
        "no filter": {},
        "grades=(4, 5)": {"grades": (4, 5)},
        "formats=(video,)": {"formats": ("video",)},
        "feature format=video": {"features": (FeatureFilter("format", ("video",)),)},
        "feature grade in 3..5": {"features": (FeatureFilter("grade", minimum=3, maximum=5),)},
    }
    for label, filters in cases.items():
        snapshot.recommend("cold", 10, **filters)  # type: ignore[arg-type]
        seconds = _median_s(lambda f=filters: snapshot.recommend("cold", 10, **f), args.repeat)  # type: ignore[misc]
        print(f"cold Recommend, {label}: {seconds * 1e6:.0f} us")
    if args.freshness:
        samples = catalog_freshness(args.freshness, args.freshness_bus)
        for path in ("catalog_add", "catalog_change", "catalog_retire"):
            summary = Summary.of(samples[path])
            print(
                f"{PATHS[path][0]} -> Recommend, {args.freshness_bus} bus, sample catalog, "
                f"{summary.n} changes: p50 {summary.p50_s * 1e3:.0f} ms, p95 {summary.p95_s * 1e3:.0f} ms, "
                f"max {summary.max_s * 1e3:.0f} ms"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
