"""Rough throughput and latency of the embedded (SQLite) event bus.

    python benchmarks/eventbus_embedded.py [--records 100000] [--size 1024] [--synchronous NORMAL]

Measures, on a fresh database in a temporary directory:
- produce: send() of N keyed records of --size bytes, then flush() (batched transactions);
- consume: one consumer group member reading them all (max_records=500 per poll);
- latency: send+flush in this process -> poll() returning in another process (p50/p99).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import tempfile
import time
from multiprocessing.queues import Queue as MpQueue
from multiprocessing.synchronize import Event as MpEvent
from pathlib import Path

from snaplearn_common.eventbus.base import TopicPartition
from snaplearn_common.eventbus.sqlite import SqliteEventBus

TOPIC = "bench.events"


def measure_produce(bus: SqliteEventBus, records: int, size: int) -> float:
    payload = os.urandom(size)
    keys = [f"user-{i}".encode() for i in range(1000)]
    with bus.producer() as producer:
        started = time.perf_counter()
        for i in range(records):
            producer.send(TOPIC, payload, key=keys[i % len(keys)], headers=(("event-id", b"%d" % i),))
        producer.flush()
        return time.perf_counter() - started


def measure_consume(bus: SqliteEventBus, records: int) -> float:
    with bus.consumer("bench-consume", [TOPIC]) as consumer:
        started = time.perf_counter()
        seen = 0
        while seen < records:
            seen += len(consumer.poll(max_records=500, timeout_s=1.0))
        return time.perf_counter() - started


def latency_consumer(path: str, samples: int, ready: MpEvent, results: MpQueue[list[float]]) -> None:
    with (
        SqliteEventBus(path) as bus,
        bus.consumer("bench-latency", [TOPIC], auto_offset_reset="latest") as consumer,
    ):
        everything = {TopicPartition(TOPIC, p) for p in range(bus.partitions_for(TOPIC))}
        while consumer.assignment() != everything:
            consumer.poll(timeout_s=0.05)
        ready.set()
        latencies: list[float] = []
        while len(latencies) < samples:
            for record in consumer.poll(timeout_s=5.0):
                latencies.append(time.time() - float(record.value))
        results.put(latencies)


def measure_latency(bus: SqliteEventBus, samples: int) -> list[float]:
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    results: MpQueue[list[float]] = context.Queue()
    child = context.Process(target=latency_consumer, args=(str(bus.path), samples, ready, results))
    child.start()
    try:
        if not ready.wait(60):
            raise RuntimeError("latency consumer did not start")
        with bus.producer() as producer:
            for i in range(samples):
                producer.send(TOPIC, repr(time.time()).encode(), key=b"user-%d" % i)
                producer.flush()
                time.sleep(0.005)  # pacing: one event every ~5 ms, so the consumer is idle-waiting
        return results.get(timeout=60)
    finally:
        child.join(60)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--size", type=int, default=1024, help="value size in bytes")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--latency-samples", type=int, default=300)
    parser.add_argument("--synchronous", choices=("NORMAL", "FULL"), default="NORMAL")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bus.db"
        with SqliteEventBus(path, synchronous=args.synchronous) as bus:
            bus.create_topic(TOPIC, args.partitions)
            produce_s = measure_produce(bus, args.records, args.size)
            consume_s = measure_consume(bus, args.records)
            latencies = sorted(measure_latency(bus, args.latency_samples))
        megabytes = args.records * args.size / 1e6
        db_mb = sum(p.stat().st_size for p in Path(tmp).iterdir()) / 1e6
    print(
        f"records={args.records} size={args.size} B partitions={args.partitions} "
        f"synchronous={args.synchronous}"
    )
    print(f"produce: {args.records / produce_s:,.0f} records/s ({megabytes / produce_s:,.1f} MB/s)")
    print(f"consume: {args.records / consume_s:,.0f} records/s ({megabytes / consume_s:,.1f} MB/s)")
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    print(
        f"latency send+flush -> poll (other process): p50 {statistics.median(latencies) * 1e3:.2f} ms, "
        f"p99 {p99 * 1e3:.2f} ms"
    )
    print(f"database + WAL on disk: {db_mb:,.0f} MB")


if __name__ == "__main__":
    main()
