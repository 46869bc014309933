"""What the fuzz tests share: how many examples to run, the seed inputs, and real servers in a thread.

The CI run is bounded and deterministic (derandomize: the same examples every run, few of them);
the long run (`.venv/bin/python scripts/fuzz.py`, or SNAPLEARN_FUZZ_EXAMPLES=N) draws many random
examples and prints the seed of any failure so it can be replayed.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

CORPUS = Path(__file__).resolve().parent.parent / "corpus"
EXAMPLES_ENV = "SNAPLEARN_FUZZ_EXAMPLES"
T = TypeVar("T")


def fuzz_settings(ci_examples: int) -> settings:
    """ci_examples in CI (derandomized); SNAPLEARN_FUZZ_EXAMPLES, when set, for a long random run."""
    wanted = os.environ.get(EXAMPLES_ENV)
    common: dict[str, Any] = {
        "deadline": None,  # a shared CI core makes per-example time noise, not a finding
        "database": None,  # nothing written into the tree
        "suppress_health_check": [
            HealthCheck.too_slow,
            HealthCheck.function_scoped_fixture,
            HealthCheck.data_too_large,
        ],
    }
    if wanted:
        return settings(max_examples=int(wanted), derandomize=False, print_blob=True, **common)
    return settings(max_examples=ci_examples, derandomize=True, **common)


def seed_images(only_valid: bool = False) -> list[bytes]:
    """The corpus's images (valid and broken ones: the starting points for mutation), or the valid ones."""
    cases = json.loads((CORPUS / "manifest.json").read_text())["cases"]
    return [
        (CORPUS / case["file"]).read_bytes()
        for case in cases
        if case["kind"] == "image" and (case["expect"] == "OK" or not only_valid)
    ]


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    """A seed image with a few bytes overwritten, a slice cut out or the tail cut off: close enough
    to a real image that the decoder gets past its magic bytes and into its headers and data."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(0, 6))):
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        data[at] = draw(st.integers(0, 255))
    if data and draw(st.booleans()):
        start = draw(st.integers(0, len(data) - 1))
        del data[start : start + draw(st.integers(0, 64))]
    if data and draw(st.booleans()):
        del data[draw(st.integers(0, len(data) - 1)) :]
    return bytes(data)


def image_bytes() -> st.SearchStrategy[bytes]:
    seeds = seed_images()
    return st.one_of(st.binary(max_size=2048), mutated(seeds), st.sampled_from(seeds))


def mostly_valid_images() -> st.SearchStrategy[bytes]:
    """For the servicers: valid photos half the time, so that examples reach batching and publishing
    (the decode path has its own fuzz test)."""
    return st.one_of(st.sampled_from(seed_images(only_valid=True)), image_bytes())


@dataclass
class InThread:
    """An asyncio loop in a daemon thread, so synchronous hypothesis tests can drive aio servers."""

    loop: asyncio.AbstractEventLoop
    thread: threading.Thread

    @classmethod
    def start(cls) -> InThread:
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="fuzz-servers", daemon=True)
        thread.start()
        return cls(loop, thread)

    def run(self, coroutine: Coroutine[Any, Any, T], timeout_s: float = 120.0) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout_s)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
