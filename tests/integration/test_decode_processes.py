"""Decode pools: threads and processes give the same pixels and errors; processes survive crashes.

Real decode processes (`python -m snaplearn_vision.decode_process`), real photos.
"""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import numpy as np
import pytest
from PIL import Image

from snaplearn_common import errors
from snaplearn_vision.decode_pool import DecodePool, decode_processes, decode_threads
from snaplearn_vision.decode_process import FAILED, DecodeProcess, DecoderFailed, _outcome
from snaplearn_vision.decoding import DecodeSpec, decode_pixels
from snaplearn_vision.worksheets import DEFAULT_TOPICS, sample_image_bytes

pytestmark = pytest.mark.timeout(60)

POOLS: dict[str, Callable[[int, int], DecodePool]] = {
    "threads": decode_threads,
    "processes": decode_processes,
}


class Model:
    """What a decoder needs of a served model: its DecodeSpec (and, for threads, decode_pixels)."""

    def __init__(self, spec: DecodeSpec) -> None:
        self.decode_spec = spec

    def decode_pixels(self, image_bytes: bytes) -> np.ndarray:
        return decode_pixels(self.decode_spec, image_bytes)


@dataclass(frozen=True)
class BrokenSpec:
    """A spec no DecodeSpec would accept (height 0): the decode process dies on its frame."""

    channels: int = 3
    height: int = 0
    width: int = 64
    max_image_bytes: int = 1_000_000
    max_image_pixels: int = 1_000_000

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.height, self.width, self.channels)


SMALL = Model(DecodeSpec(3, 64, 64))
GREY = Model(DecodeSpec(1, 32, 48, max_image_bytes=200_000))


def photos(count: int) -> list[bytes]:
    return [sample_image_bytes(DEFAULT_TOPICS[i % len(DEFAULT_TOPICS)], seed=i) for i in range(count)]


@pytest.fixture(params=sorted(POOLS))
async def pool(request: pytest.FixtureRequest) -> AsyncIterator[DecodePool]:
    decoders = POOLS[request.param](2, 0)
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


@pytest.mark.parametrize("kind", sorted(POOLS))
async def test_a_stopped_pool_refuses_work_and_leaves_no_process_behind(kind: str) -> None:
    pool = POOLS[kind](2, 0)
    pool.start()
    pixels, _ = await pool.run((SMALL, photos(1)[0]))
    assert pixels.shape == (64, 64, 3)
    await pool.stop()
    with pytest.raises(errors.Unavailable, match="not running"):
        await pool.run((SMALL, photos(1)[0]))
    assert not _decode_children()


# -- the decode process itself -------------------------------------------------------------


def _decode_children() -> list[str]:
    listing = subprocess.run(
        ["ps", "-o", "pid=,args=", "--ppid", str(os.getpid())], capture_output=True, text=True, check=True
    )
    return [line for line in listing.stdout.splitlines() if "snaplearn_vision.decode_process" in line]


async def until(condition: Callable[[], bool]) -> None:
    while not condition():  # noqa: ASYNC110 (the state changes on this very loop)
        await asyncio.sleep(0)


async def test_a_killed_decode_process_is_replaced_and_its_chunk_decoded() -> None:
    restarted: list[int] = []
    decoder = DecodeProcess(name="test-decode", on_restart=lambda: restarted.append(1))
    await decoder.start()
    try:
        images = photos(3)
        first = await decoder.decode([(SMALL, images[0])])
        assert first[0][0] is True
        assert decoder.pid is not None
        os.kill(decoder.pid, signal.SIGKILL)
        outcomes = await decoder.decode([(SMALL, image) for image in images])
    finally:
        await decoder.retire()
    assert [ok for ok, _, _ in outcomes] == [True, True, True]
    for (_, pixels, _), image in zip(outcomes, images, strict=True):
        np.testing.assert_array_equal(pixels, SMALL.decode_pixels(image))
    assert decoder.restarts == 1 and restarted == [1]


async def test_a_frame_that_kills_a_fresh_decoder_alone_is_refused_and_the_rest_decoded() -> None:
    decoder = DecodeProcess(name="test-decode")
    await decoder.start()
    broken = Model(BrokenSpec())  # type: ignore[arg-type]
    try:
        images = photos(2)
        outcomes = await decoder.decode([(SMALL, images[0]), (broken, images[1]), (SMALL, images[1])])
    finally:
        await decoder.retire()
    assert outcomes[0][0] is True and outcomes[2][0] is True
    np.testing.assert_array_equal(outcomes[2][1], SMALL.decode_pixels(images[1]))
    ok, error, _ = outcomes[1]
    assert ok is False and isinstance(error, errors.InvalidInput) and "crashed the decoder" in str(error)
    # Once for the chunk, once after the culprit killed the fresh decoder on its own.
    assert decoder.restarts == 2


def slow_photo() -> bytes:
    """A 48-megapixel PNG of 60 KB: within every limit, ~0.3 s of inflating and resizing here."""
    buffer = io.BytesIO()
    Image.linear_gradient("L").resize((8000, 6000)).save(buffer, "PNG")
    return buffer.getvalue()


async def test_a_photo_that_outlasts_the_decode_timeout_is_refused_and_the_rest_decoded() -> None:
    # 100 ms: ~50x a worksheet photo's decode, a third of the slow photo's.
    decoder = DecodeProcess(name="test-decode", decode_timeout_s=0.1)
    await decoder.start()
    roomy = Model(DecodeSpec(3, 64, 64, max_image_bytes=1_000_000))
    images = photos(2)
    try:
        outcomes = await decoder.decode([(SMALL, images[0]), (roomy, slow_photo()), (SMALL, images[1])])
    finally:
        await decoder.retire()
    for index, image in ((0, images[0]), (2, images[1])):
        ok, pixels, _ = outcomes[index]
        assert ok is True
        np.testing.assert_array_equal(pixels, SMALL.decode_pixels(image))
    ok, error, _ = outcomes[1]
    assert ok is False and isinstance(error, errors.InvalidInput)
    assert "took longer than 0.1 s" in str(error)
    # Killed under the chunk, then again when the slow photo was retried alone.
    assert decoder.restarts == 2


async def test_a_retired_decoder_answers_unavailable_not_a_new_process() -> None:
    decoder = DecodeProcess(name="test-decode")
    await decoder.start()
    await decoder.retire()
    [(ok, error, _)] = await decoder.decode([(SMALL, photos(1)[0])])
    assert ok is False and isinstance(error, errors.Unavailable) and "shutting down" in str(error)
    assert decoder.restarts == 0


async def test_stopping_without_drain_ends_a_chunk_in_progress_with_unavailable() -> None:
    pool = decode_processes(1, 0)
    pool.start()
    big = Model(DecodeSpec(3, 1024, 1024))  # a few ms per photo: the chunk is still decoding
    calls = [asyncio.ensure_future(pool.run((big, image))) for image in photos(8)]
    await until(lambda: pool.chunks >= 1)  # type: ignore[attr-defined]
    await pool.stop(drain=False)
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    assert all(isinstance(outcome, errors.Unavailable) for outcome in outcomes[1:])
    assert not _decode_children()


def test_an_unexpected_decoder_error_keeps_its_type_name_for_the_log() -> None:
    ok, error, seconds = _outcome(FAILED, 0.25, b"KeyError\nTraceback: ...", SMALL.decode_spec)
    assert ok is False and seconds == 0.25
    assert isinstance(error, DecoderFailed) and error.type_name == "KeyError"
    assert "Traceback: ..." in str(error)


def test_a_decode_process_does_not_import_torch() -> None:
    # What keeps it small and quick to start: decoding.py is Pillow and numpy only.
    probe = "import sys, snaplearn_vision.decode_process; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
