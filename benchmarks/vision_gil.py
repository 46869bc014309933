"""What sharing the GIL costs a decode: one decode thread alone, then beside a thread running
pure Python (the part an event loop plays in a server process), at several switch intervals.

    python benchmarks/vision_gil.py                         # default model, 4 s per case
    python benchmarks/vision_gil.py --intervals-ms 5,1,0.2 --seconds 8

A decode (engine.decode_pixels: JPEG header parsing in Python, then decode and resize in C with
the GIL released) hands the GIL back and forth several times; beside a thread that holds it, each
time it waits up to the switch interval (sys.setswitchinterval) to get it back. Per case: wall
time and CPU time per decode, and the time the decode thread waited for a core (runqueue, from
/proc/thread-self/schedstat on Linux); wall - CPU - runqueue is mostly waiting for the GIL.
DECISIONS D25.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules, run as a script
from vision_raw import TOPICS, apply_torch_settings


def _runqueue_s() -> float:
    """Seconds this thread has waited for a core so far (0.0 where the kernel does not say)."""
    try:
        with open("/proc/thread-self/schedstat") as stats:
            return int(stats.read().split()[1]) / 1e9
    except OSError:
        return 0.0


def measure(
    decode: Callable[[bytes], object], photos: list[bytes], seconds: float, beside_python: bool
) -> dict[str, float]:
    """Decode `photos` round-robin for `seconds` on a fresh thread, optionally beside a busy
    pure-Python thread; per decode: wall, CPU and runqueue microseconds."""
    stop = threading.Event()
    result: dict[str, float] = {}

    def busy() -> None:
        count = 0
        while not stop.is_set():
            count += 1

    def decoder() -> None:
        decodes = 0
        wall0, cpu0, queue0 = time.perf_counter(), time.thread_time(), _runqueue_s()
        while time.perf_counter() - wall0 < seconds:
            for photo in photos:
                decode(photo)
            decodes += len(photos)
        result.update(
            wall_us=(time.perf_counter() - wall0) / decodes * 1e6,
            cpu_us=(time.thread_time() - cpu0) / decodes * 1e6,
            runqueue_us=(_runqueue_s() - queue0) / decodes * 1e6,
        )

    helper = threading.Thread(target=busy) if beside_python else None
    if helper is not None:
        helper.start()
    worker = threading.Thread(target=decoder)
    worker.start()
    worker.join()
    stop.set()
    if helper is not None:
        helper.join()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repository", type=Path, default=Path("var/models"))
    parser.add_argument("--model", default="worksheet-topics")
    parser.add_argument("--seconds", type=float, default=4.0, help="per case")
    parser.add_argument("--intervals-ms", default="5,1,0.2", help="switch intervals beside Python")
    args = parser.parse_args(argv)
    apply_torch_settings(1)
    from snaplearn_vision.model_repository import ModelRepository
    from snaplearn_vision.worksheets import sample_image_bytes

    classifier = ModelRepository(args.repository).load(args.model, device="cpu")
    photos = [sample_image_bytes(TOPICS[i % len(TOPICS)], seed=i) for i in range(64)]
    cases = [("alone", 5.0, False)] + [
        (f"beside Python, switch interval {ms:g} ms", ms, True)
        for ms in (float(text) for text in args.intervals_ms.split(",") if text.strip())
    ]
    rows = []
    for name, interval_ms, beside in cases:
        sys.setswitchinterval(interval_ms / 1000.0)
        row = {"case": name, **measure(classifier.decode_pixels, photos, args.seconds, beside)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("| decode | wall us | CPU us | waiting for a core us | the rest (the GIL) us |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        rest = row["wall_us"] - row["cpu_us"] - row["runqueue_us"]
        print(
            f"| {row['case']} | {row['wall_us']:.0f} | {row['cpu_us']:.0f} | {row['runqueue_us']:.0f} "
            f"| {rest:.0f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
