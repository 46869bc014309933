"""Cost of a live catalog change and of feature filters (DECISIONS D41, D42).

    python benchmarks/catalog_live.py [--items N] [--repeat R] [--freshness N]

Builds the serving benchmark's synthetic catalog (snaplearn_bench.recommender_serving.big_catalog),
then times, in this process: one CatalogItemAdded applied plus the snapshot that follows it (what
the worker does per batch), and a cold Recommend without a filter, with the grade / format fields
and with declared-feature filters. Medians of R runs; numbers depend on the machine.

--freshness N: also start a standalone recommender (TrainerApp over an embedded bus in a temporary
directory, sample catalog), publish N catalog additions one at a time, and time each from publish
to the first Recommend over gRPC that returns the new item (p50 / p95 / max).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import grpc

from snaplearn.events.v1 import events_pb2
from snaplearn.recommender.v1 import recommender_pb2, recommender_pb2_grpc
from snaplearn_bench.recommender_serving import big_catalog
from snaplearn_common.eventbus.sqlite import SqliteEventBus
from snaplearn_common.events import encode_catalog_change
from snaplearn_recommender.catalog import LearningItem, item_to_proto
from snaplearn_recommender.config import RecommenderSettings
from snaplearn_recommender.model import CatalogChange, RecommenderModel
from snaplearn_recommender.snapshot import FeatureFilter
from snaplearn_recommender.trainer import TrainerApp


def _median_s(run: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


async def freshness(changes: int) -> list[float]:
    """Seconds from publishing a CatalogItemAdded to a Recommend (gRPC) that returns the item."""
    with tempfile.TemporaryDirectory() as directory:
        bus = SqliteEventBus(Path(directory) / "bus.db")
        settings = RecommenderSettings(
            port=0, metrics_port=0, checkpoint_dir=Path(directory), batch_max_wait_ms=10
        )
        app = await TrainerApp.start(settings, bus)
        producer = bus.producer()
        seconds: list[float] = []
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
                stub = recommender_pb2_grpc.RecommenderServiceStub(channel)
                for number in range(changes):
                    item = LearningItem(
                        f"fresh-{number}",
                        f"Fresh {number}",
                        ("fractions",),
                        features={"batch": (f"b{number}",)},
                    )
                    event = encode_catalog_change(
                        events_pb2.CatalogItemAdded(event_id=f"fresh-{number}", item=item_to_proto(item))
                    )
                    request = recommender_pb2.RecommendRequest(
                        user_id="cold",
                        k=1,
                        filters=recommender_pb2.RecommendFilters(
                            features=[recommender_pb2.FeatureFilter(name="batch", values=[f"b{number}"])]
                        ),
                    )
                    started = time.perf_counter()
                    producer.send(settings.bus.topic, event.value, key=event.key, headers=event.headers)
                    producer.flush()
                    while True:
                        try:
                            if (await stub.Recommend(request, timeout=5)).items:
                                break
                        except grpc.aio.AioRpcError as error:  # unknown feature value until applied
                            if error.code() != grpc.StatusCode.INVALID_ARGUMENT:
                                raise
                        await asyncio.sleep(0.002)
                    seconds.append(time.perf_counter() - started)
        finally:
            producer.close()
            await app.stop()
            bus.close()
        return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--freshness", type=int, default=0, metavar="N")
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
        times = sorted(asyncio.run(freshness(args.freshness)))
        p95 = times[min(len(times) - 1, int(0.95 * len(times)))]
        print(
            f"catalog change -> Recommend, embedded bus, sample catalog, {len(times)} changes: "
            f"p50 {statistics.median(times) * 1e3:.0f} ms, p95 {p95 * 1e3:.0f} ms, "
            f"max {times[-1] * 1e3:.0f} ms"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
