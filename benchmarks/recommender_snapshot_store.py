"""What scale-out costs per snapshot version: build vs publish vs a replica's load, side by side.

    python benchmarks/recommender_snapshot_store.py [--items 100000] [--events 20000] [--repeats 7]

Builds a RecommenderModel over the synthetic catalog of benchmarks/recommender_serving.py, applies
--events events, then times (medians of --repeats, in one run): model.snapshot() (what the trainer
does after every micro-batch anyway), SnapshotStore.publish (pickle + sha256 + write + fsync +
rename + LATEST) and SnapshotStore.load (read + verify + unpickle + the snapshot's derived arrays),
into a temporary directory on the local disk, with the catalog section cached (steady state) and
new (first publish / load in a process, or after new items). A replica lags the trainer by up to
publish interval + poll interval + load time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent))

from recommender_serving import USERS, big_catalog

from snaplearn_recommender.bench import synthetic_events
from snaplearn_recommender.model import RecommenderModel
from snaplearn_recommender.snapshot_store import LocalDirectoryStorage, SnapshotStore

T = TypeVar("T")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    model = RecommenderModel(big_catalog(args.items))
    events = synthetic_events(args.events, USERS)
    for first in range(0, len(events), 1000):
        model.apply(events[first : first + 1000])
    times: dict[str, list[float]] = {
        name: [] for name in ("build", "publish", "load", "cold publish", "cold load")
    }

    def timed(name: str, work: Callable[[], T]) -> T:
        started = time.perf_counter()
        result = work()
        times[name].append(time.perf_counter() - started)
        return result

    with tempfile.TemporaryDirectory() as directory:
        trainer = SnapshotStore(LocalDirectoryStorage(directory), retain=2)
        replica = SnapshotStore(LocalDirectoryStorage(directory))
        timed("publish", lambda: trainer.publish(model.snapshot()))  # the catalog cache warms up
        timed("load", lambda: replica.load(trainer.versions()[-1]))
        times["publish"].clear()
        times["load"].clear()
        for _ in range(args.repeats):
            snapshot = timed("build", model.snapshot)
            # Steady state: the same trainer and replica objects, the catalog unchanged.
            manifest = timed("publish", lambda: trainer.publish(snapshot))  # noqa: B023
            _, loaded = timed("load", lambda: replica.load(manifest.version))  # noqa: B023
            assert loaded.version == snapshot.version
            # A catalog seen for the first time (a fresh process, or new items).
            fresh = SnapshotStore(LocalDirectoryStorage(directory), retain=2)
            cold = timed("cold publish", lambda: fresh.publish(snapshot))  # noqa: B023
            timed("cold load", lambda: SnapshotStore(LocalDirectoryStorage(directory)).load(cold.version))  # noqa: B023
    ms = {name: statistics.median(values) * 1000 for name, values in times.items()}
    print(
        f"{model.n_items} items, {model.n_users} users, {manifest.size / 1e6:.1f} MB per version "
        f"(catalog {manifest.catalog_size / 1e6:.1f} MB); medians of {args.repeats}, ms:"
    )
    for name in ("publish", "load"):
        print(
            f"  {name:8s} {ms[name]:6.0f} (catalog cached) | {ms['cold ' + name]:6.0f} (catalog new) "
            f"| ratio {ms['cold ' + name] / ms[name]:.1f}x | snapshot build {ms['build']:.0f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
