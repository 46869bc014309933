"""ChunkedPool: per-item results and errors, chunked hand-offs under load, cancellation, stop;
and the server's decode pool over it (decode_threads), on real photos.

The pool function blocks on a threading.Event, so "while every thread is busy" is a state
the test holds, not a timing it hopes for.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable

import numpy as np
import pytest

from snaplearn_common import errors
from snaplearn_common.topics import DEFAULT_TOPICS
from snaplearn_vision.runtime.decode_pool import ChunkedPool, DecodePool, decode_threads
from snaplearn_vision.runtime.decoding import decode_pixels
from snaplearn_vision.schema import DecodeSpec
from snaplearn_vision.worksheets import sample_image_bytes

pytestmark = pytest.mark.timeout(30)


class GatedSquare:
    """Squares its argument; the argument 0 blocks until `release` is set; -1 raises."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.blocked = threading.Event()
        self.seen: list[int] = []
        self.threads: set[str] = set()

    def __call__(self, value: int) -> int:
        self.seen.append(value)
        self.threads.add(threading.current_thread().name)
        if value == 0:
            self.blocked.set()
            self.release.wait(timeout=20)
        if value < 0:
            raise ValueError(f"bad item {value}")
        return value * value


async def until(condition: Callable[[], bool]) -> None:
    """Let the loop run the tasks just created until `condition` holds (no wall-clock wait)."""
    while not condition():  # noqa: ASYNC110 (the state changes on this very loop; nothing to wait on)
        await asyncio.sleep(0)


async def test_results_come_back_per_item_with_their_own_compute_time() -> None:
    function = GatedSquare()
    pool: ChunkedPool[int, int] = ChunkedPool(function, threads=2, name="t-decode")
    pool.start()
    try:
        results = await asyncio.gather(*(pool.run(value) for value in (2, 3, 4)))
    finally:
        await pool.stop()
    assert [value for value, _ in results] == [4, 9, 16]
    assert all(seconds >= 0.0 for _, seconds in results)
    assert function.threads and all(name.startswith("t-decode") for name in function.threads)


async def test_items_waiting_for_a_busy_thread_are_handed_over_as_one_chunk() -> None:
    function = GatedSquare()
    pool: ChunkedPool[int, int] = ChunkedPool(function, threads=1)
    pool.start()
    try:
        first = asyncio.ensure_future(pool.run(0))
        await asyncio.to_thread(function.blocked.wait, 20)
        waiting = [asyncio.ensure_future(pool.run(value)) for value in range(1, 6)]
        await until(lambda: pool.waiting == 5)
        assert pool.chunks == 1  # the blocked item's alone; the five wait in the pool, not in threads
        function.release.set()
        results = await asyncio.gather(first, *waiting)
    finally:
        await pool.stop()
    assert [value for value, _ in results] == [0, 1, 4, 9, 16, 25]
    assert (pool.chunks, pool.items) == (2, 6)  # six requests, two hand-offs


async def test_waiting_items_are_shared_evenly_between_threads_not_taken_by_the_first_free() -> None:
    function = GatedSquare()
    pool: ChunkedPool[int, int] = ChunkedPool(function, threads=2, max_chunk=8)
    pool.start()
    try:
        blockers = [asyncio.ensure_future(pool.run(0)) for _ in range(2)]  # both threads held
        await until(lambda: pool.chunks == 2 and pool.waiting == 0)
        waiting = [asyncio.ensure_future(pool.run(value)) for value in range(1, 13)]
        await until(lambda: pool.waiting == 12)
        function.release.set()
        results = await asyncio.gather(*blockers, *waiting)
    finally:
        await pool.stop()
    assert [value for value, _ in results] == [0, 0, *(v * v for v in range(1, 13))]
    # The first thread to free up takes half of the twelve (not all twelve, leaving the other idle).
    assert pool.largest_chunk == 6
    assert pool.items == 14


async def test_a_failing_item_fails_only_its_own_caller() -> None:
    function = GatedSquare()
    pool: ChunkedPool[int, int] = ChunkedPool(function, threads=1)
    pool.start()
    try:
        blocker = asyncio.ensure_future(pool.run(0))
        await asyncio.to_thread(function.blocked.wait, 20)
        calls = [asyncio.ensure_future(pool.run(value)) for value in (5, -1, 6)]
        await until(lambda: pool.waiting == 3)
        function.release.set()
        outcomes = await asyncio.gather(blocker, *calls, return_exceptions=True)
    finally:
        await pool.stop()
    assert outcomes[0] == (0, outcomes[0][1])  # type: ignore[index]
    assert outcomes[1][0] == 25 and outcomes[3][0] == 36  # type: ignore[index]
    assert isinstance(outcomes[2], ValueError) and "bad item -1" in str(outcomes[2])
    assert pool.chunks == 2  # the three shared one chunk


async def test_a_caller_that_goes_away_before_a_thread_takes_its_item_is_skipped() -> None:
    function = GatedSquare()
    pool: ChunkedPool[int, int] = ChunkedPool(function, threads=1)
    pool.start()
    try:
        blocker = asyncio.ensure_future(pool.run(0))
        await asyncio.to_thread(function.blocked.wait, 20)
        gone = asyncio.ensure_future(pool.run(7))
        kept = asyncio.ensure_future(pool.run(8))
        await until(lambda: pool.waiting == 2)
        gone.cancel()
        function.release.set()
        assert (await kept)[0] == 64
        await blocker
    finally:
        await pool.stop()
    assert gone.cancelled()
    assert function.seen == [0, 8]  # 7 was never decoded


async def test_stop_fails_what_still_waits_and_refuses_new_work() -> None:
    function = GatedSquare()
    pool: ChunkedPool[int, int] = ChunkedPool(function, threads=1)
    pool.start()
    blocker = asyncio.ensure_future(pool.run(0))
    await asyncio.to_thread(function.blocked.wait, 20)
    stranded = asyncio.ensure_future(pool.run(3))
    await until(lambda: pool.waiting == 1)
    stopping = asyncio.ensure_future(pool.stop(drain=True))
    with pytest.raises(errors.Unavailable, match="shutting down"):
        await stranded
    function.release.set()
    await stopping
    assert (await blocker)[0] == 0  # the chunk already on a thread finished
    with pytest.raises(errors.Unavailable, match="not running"):
        await pool.run(1)
    assert function.seen == [0]


def test_invalid_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="threads"):
        ChunkedPool(abs, threads=0)
    with pytest.raises(ValueError, match="max_chunk"):
        ChunkedPool(abs, threads=1, max_chunk=0)


# -- the server's decode pool (decode_threads) -------------------------------------------------


class Model:
    """What a decode thread needs of a served model: its decode_pixels."""

    def __init__(self, spec: DecodeSpec) -> None:
        self.decode_spec = spec

    def decode_pixels(self, image_bytes: bytes) -> np.ndarray:
        return decode_pixels(self.decode_spec, image_bytes)


SMALL = Model(DecodeSpec(3, 64, 64))
GREY = Model(DecodeSpec(1, 32, 48, max_image_bytes=200_000))


def photos(count: int) -> list[bytes]:
    return [sample_image_bytes(DEFAULT_TOPICS[i % len(DEFAULT_TOPICS)], seed=i) for i in range(count)]


@pytest.fixture
async def pool() -> AsyncIterator[DecodePool]:
    decoders = decode_threads(2, 0)
    decoders.start()
    yield decoders
    await decoders.stop()


async def test_pixels_are_those_of_the_in_process_decoder_for_every_model_shape(pool: DecodePool) -> None:
    images = photos(12)
    jobs = [(SMALL if i % 2 else GREY, image) for i, image in enumerate(images)]
    results = await asyncio.gather(*(pool.run(job) for job in jobs))
    for (model, image), (pixels, seconds) in zip(jobs, results, strict=True):
        assert pixels.shape == model.decode_spec.shape
        assert pixels.dtype == np.uint8
        np.testing.assert_array_equal(pixels, model.decode_pixels(image))
        assert seconds > 0.0


async def test_a_bad_photo_fails_only_its_own_caller_with_the_decoders_message(pool: DecodePool) -> None:
    good = photos(3)
    huge = b"\xff\xd8" + b"\0" * 200_001  # over GREY's byte limit
    outcomes = await asyncio.gather(
        pool.run((SMALL, good[0])),
        pool.run((SMALL, b"definitely not a photo")),
        pool.run((GREY, huge)),
        pool.run((SMALL, good[1])),
        pool.run((SMALL, b"")),
        pool.run((GREY, good[2])),
        return_exceptions=True,
    )
    assert isinstance(outcomes[1], errors.InvalidInput) and "not a decodable image" in str(outcomes[1])
    assert isinstance(outcomes[2], errors.InvalidInput) and "the limit is 200000 bytes" in str(outcomes[2])
    assert isinstance(outcomes[4], errors.InvalidInput) and "image is empty" in str(outcomes[4])
    for index, (model, image) in ((0, (SMALL, good[0])), (3, (SMALL, good[1])), (5, (GREY, good[2]))):
        pixels, _ = outcomes[index]  # type: ignore[misc]
        np.testing.assert_array_equal(pixels, model.decode_pixels(image))


async def test_a_stopped_decode_pool_refuses_work() -> None:
    pool = decode_threads(2, 0)
    pool.start()
    pixels, _ = await pool.run((SMALL, photos(1)[0]))
    assert pixels.shape == (64, 64, 3)
    await pool.stop()
    with pytest.raises(errors.Unavailable, match="not running"):
        await pool.run((SMALL, photos(1)[0]))
