"""What the EventPublisher's linger saves: CPU per event of its drainer and the bus's writer thread.

    python benchmarks/publisher_linger.py [--rate 1500] [--seconds 5] [--lingers 0,0.005,0.01]

Publishes ImageClassified events at a fixed rate (as a vision server does, one per photo) through
an EventPublisher into the embedded bus (a SQLite file in a temporary directory), once per linger,
interleaved over --reps, and reads each thread's CPU time from /proc/self/task. Prints one JSON
line per measurement and the medians. Linux only (per-thread CPU from /proc).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules, run as a script
from vision_threads import thread_cpu

from snaplearn_common.eventbus.publisher import EventPublisher
from snaplearn_common.eventbus.sqlite import SqliteEventBus
from snaplearn_common.events import IMAGE_CLASSIFIED_TOPIC, EncodedEvent, encode_image_classified

DRAINER = "event-publisher"
WRITER = "snaplearn-bus-producer"


def thread_cpu_s() -> dict[str, float]:
    """CPU seconds so far of this process's threads, by Python thread name."""
    names = {thread.native_id: thread.name for thread in threading.enumerate() if thread.native_id}
    return thread_cpu(os.getpid(), names)


def event(index: int) -> EncodedEvent:
    return encode_image_classified(
        event_id=f"event-{index}",
        user_id=f"student-{index % 50}",
        time_s=time.time(),
        model_name="worksheet-topics",
        model_version="1",
        labels=[("fractions", 0.9), ("geometry", 0.05), ("decimals", 0.05)],
    )


def measure(linger_s: float, rate: float, seconds: float) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as scratch:
        bus = SqliteEventBus(Path(scratch) / "bus.db")
        producer = bus.producer()
        publisher = EventPublisher(producer, linger_s=linger_s)
        publisher.start()
        events = [event(index) for index in range(int(rate * seconds))]  # encoded before timing
        before = thread_cpu_s()
        started = time.monotonic()
        for index, encoded in enumerate(events):
            delay = started + index / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            publisher.publish(IMAGE_CLASSIFIED_TOPIC, encoded)
        while publisher.published < len(events) and time.monotonic() - started < seconds + 10:
            time.sleep(0.01)
        after = thread_cpu_s()
        published = publisher.published
        publisher.stop()
        producer.close()
        bus.close()
    per_event = {
        name: (after.get(name, 0.0) - before.get(name, 0.0)) / len(events) * 1e6 for name in (DRAINER, WRITER)
    }
    return {
        "linger_ms": linger_s * 1000,
        "events": len(events),
        "published": published,
        "drainer_us_per_event": round(per_event[DRAINER], 1),
        "writer_us_per_event": round(per_event[WRITER], 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", type=float, default=1500.0, help="events per second")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--lingers", default="0,0.005,0.01", help="linger_s values, comma-separated")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args(argv)
    lingers = [float(value) for value in args.lingers.split(",")]
    rows: dict[float, list[dict[str, float]]] = {}
    for rep in range(args.reps):
        for linger_s in lingers if rep % 2 == 0 else reversed(lingers):
            row = measure(linger_s, args.rate, args.seconds)
            rows.setdefault(linger_s, []).append(row)
            print(json.dumps(row), flush=True)
    print(f"{args.rate:g} events/s, {args.seconds:g} s, medians of {args.reps} (CPU in 10 ms ticks)")
    print("| linger ms | drainer us/event | bus writer us/event |")
    print("|---:|---:|---:|")
    for linger_s, samples in rows.items():
        drainer = statistics.median(row["drainer_us_per_event"] for row in samples)
        writer = statistics.median(row["writer_us_per_event"] for row in samples)
        print(f"| {linger_s * 1000:g} | {drainer:.0f} | {writer:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
