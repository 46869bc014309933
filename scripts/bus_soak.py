"""Soak the embedded bus with its retention on: does the file's size level off?

    .venv/bin/python scripts/bus_soak.py --seconds 120 --rate 2000 --bus-retention-bytes 2000000

One producer appends ImageClassified events (as the vision server's publisher does: batches,
a key per student) at --rate events/s into a fresh bus file; one consumer group reads them
and commits every half second (as the recommender does after a checkpoint). Every
--report-every seconds it prints the file's size (database + WAL), the records kept and the
oldest offset retained; at the end a markdown table for docs/benchmarks/bus.md. Retention
settings are the servers' own flags (--bus-retention-age, --bus-retention-bytes,
--bus-retention-check-interval).
"""

from __future__ import annotations

import argparse
import sqlite3
import tempfile
import threading
import time
from pathlib import Path

from snaplearn_common.eventbus.factory import open_bus
from snaplearn_common.eventbus.settings import BusSettings
from snaplearn_common.eventbus.sqlite import SqliteEventBus
from snaplearn_common.events import encode_image_classified

TOPIC = "soak.image-classified"
PARTITIONS = 4
LABELS = [("fractions", 0.81), ("geometry", 0.12), ("decimals", 0.04), ("algebra", 0.02), ("ratios", 0.01)]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--rate", type=float, default=2000.0, help="events per second")
    parser.add_argument("--report-every", type=float, default=10.0)
    parser.add_argument("--bus-retention-age", type=float, default=7 * 24 * 3600.0)
    parser.add_argument("--bus-retention-bytes", type=int, default=2_000_000, help="per partition")
    parser.add_argument("--bus-retention-check-interval", type=float, default=5.0)
    parser.add_argument(
        "--dir", type=Path, default=None, help="where the bus file goes (default: a temp dir)"
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        path = (args.dir or Path(scratch)) / "soak-bus.db"
        for stale in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            stale.unlink(missing_ok=True)
        settings = BusSettings(
            embedded_path=str(path),
            partitions=PARTITIONS,
            retention_age_s=args.bus_retention_age,
            retention_bytes=args.bus_retention_bytes,
            retention_check_interval_s=args.bus_retention_check_interval,
        )
        with open_bus(settings) as bus:
            assert isinstance(bus, SqliteEventBus)
            rows = soak(bus, args.seconds, args.rate, args.report_every)
    print()
    print(
        f"embedded bus soak: {args.rate:.0f} events/s for {args.seconds:.0f} s, retention "
        f"{args.bus_retention_bytes} bytes/partition x {PARTITIONS} partitions, checked every "
        f"{args.bus_retention_check_interval:.0f} s"
    )
    print()
    print("| elapsed s | events produced | file MB | records kept | oldest offset (sum) |")
    print("|---:|---:|---:|---:|---:|")
    for elapsed, produced, size, kept, oldest in rows:
        print(f"| {elapsed:.0f} | {produced} | {size / 1e6:.1f} | {kept} | {oldest} |")


def soak(
    bus: SqliteEventBus, seconds: float, rate: float, report_every: float
) -> list[tuple[float, int, int, int, int]]:
    bus.create_topic(TOPIC, PARTITIONS)
    stop = threading.Event()
    produced = [0]

    def produce() -> None:
        batch = max(1, int(rate / 20))
        with bus.producer() as producer:
            started = time.monotonic()
            while not stop.is_set():
                for _ in range(batch):
                    i = produced[0]
                    event = encode_image_classified(
                        f"soak-{i:09d}", f"student-{i % 5000}", time.time(), "worksheet-cnn", "1", LABELS
                    )
                    producer.send(TOPIC, event.value, key=event.key, headers=event.headers)
                    produced[0] += 1
                producer.flush(30)
                ahead = produced[0] / rate - (time.monotonic() - started)
                if ahead > 0:
                    stop.wait(ahead)

    def consume() -> None:
        with bus.consumer("soak-reader", [TOPIC]) as consumer:
            next_commit = time.monotonic() + 0.5
            while not stop.is_set():
                consumer.poll(max_records=2000, timeout_s=0.2)
                if time.monotonic() >= next_commit:
                    consumer.commit()
                    next_commit = time.monotonic() + 0.5

    threads = [threading.Thread(target=produce, daemon=True), threading.Thread(target=consume, daemon=True)]
    for thread in threads:
        thread.start()
    rows = []
    started = time.monotonic()
    with sqlite3.connect(bus.path) as reader:
        while True:
            elapsed = time.monotonic() - started
            stats = bus.stats()
            kept = int(reader.execute("SELECT COUNT(*) FROM records WHERE topic = ?", (TOPIC,)).fetchone()[0])
            oldest = sum(offset for tp, offset in stats.oldest_offsets.items() if tp.topic == TOPIC)
            rows.append((elapsed, produced[0], stats.file_bytes, kept, oldest))
            print(
                f"{elapsed:6.0f} s  produced {produced[0]:>8}  "
                f"file {stats.file_bytes / 1e6:7.1f} MB  kept {kept}"
            )
            if elapsed >= seconds:
                break
            time.sleep(min(report_every, max(0.0, seconds - elapsed)))
    stop.set()
    for thread in threads:
        thread.join(30)
    return rows


if __name__ == "__main__":
    main()
