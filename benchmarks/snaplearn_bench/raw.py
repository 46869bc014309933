"""The raw bound: decode + preprocess + forward in a tight loop, no server, no network.

    python -m snaplearn_bench.raw --repository var/bench-models --model mobilenet_v3_small

For each batch size: decode a batch of real JPEG photos on a pool of --decode-threads threads
(the server's decode pool size), then run the model on it, back to back, for --seconds.
Reports images per second per batch size and the best, as JSON. Uses the very same engine
code as the server (ImageClassifier.decode_pixels / predict_pixels), so the difference to a
server is the serving layer alone.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from snaplearn_bench.models import load_classifier
from snaplearn_vision.worksheets import sample_image_bytes

TOPICS = ("addition", "fractions", "geometry", "exponents")


def apply_torch_settings(threads: int) -> None:
    """The torch settings every contender gets (raw bound, our server, the peers).

    Call first thing in the process: threads (OpenMP workers among them) copy the denormal
    mode of the thread that creates them, so setting it after a parallel region ran leaves
    those workers slow. Our server's engine sets it on its model thread before that thread's
    first forward pass, which has the same effect.
    """
    torch.set_flush_denormal(True)
    torch.set_num_threads(threads)


def measure(
    repository: Path, model: str, batch_sizes: list[int], seconds: float, decode_threads: int
) -> dict:
    classifier = load_classifier(repository, model)
    photos = [sample_image_bytes(TOPICS[i % len(TOPICS)], seed=i) for i in range(64)]
    rates: dict[int, float] = {}
    cpu_per_image: dict[int, float] = {}  # this process's CPU (every thread), microseconds
    with ThreadPoolExecutor(decode_threads) as pool:
        for batch_size in batch_sizes:
            batch = [photos[i % len(photos)] for i in range(batch_size)]
            classifier.predict_pixels(list(pool.map(classifier.decode_pixels, batch)))  # warm this shape
            images = 0
            started, cpu_started = time.perf_counter(), _cpu_s()
            while time.perf_counter() - started < seconds:
                classifier.predict_pixels(list(pool.map(classifier.decode_pixels, batch)))
                images += batch_size
            rates[batch_size] = images / (time.perf_counter() - started)
            cpu_per_image[batch_size] = (_cpu_s() - cpu_started) / images * 1e6
    best = max(rates, key=lambda size: rates[size])
    return {
        "images_per_s": rates[best],
        "best_batch_size": best,
        "by_batch_size": rates,
        "cpu_us_per_image": cpu_per_image[best],
    }


def _cpu_s() -> float:
    times = os.times()
    return times.user + times.system


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repository", type=Path, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--batch-sizes", default="1,8,16,32")
    parser.add_argument("--seconds", type=float, default=5.0, help="per batch size")
    parser.add_argument("--decode-threads", type=int, default=2)
    parser.add_argument("--torch-threads", type=int, default=2)
    args = parser.parse_args(argv)
    apply_torch_settings(args.torch_threads)
    sizes = [int(size) for size in args.batch_sizes.split(",")]
    result = measure(args.repository, args.model, sizes, args.seconds, args.decode_threads)
    json.dump(result, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
