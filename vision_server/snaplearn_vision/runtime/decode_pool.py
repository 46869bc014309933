"""A few threads that run a blocking per-item function, handed work in chunks, not per item.

`loop.run_in_executor` costs every request a concurrent.futures.Future, a chained asyncio
future, a queue hand-off and a `call_soon_threadsafe` (a write to the event loop's self-pipe
and a wake-up) when it finishes, all paid by the event loop thread, the one that also answers
refusals. Here a request parks a plain loop future and, while every thread is busy, simply
waits in a deque; a thread that frees up takes its share of everything waiting (one hand-off
for the chunk) and reports the whole chunk back with one `call_soon_threadsafe`. Under light
load a chunk is one item, so latency is that of a plain executor; under load the hand-offs per
request fall towards 1/chunk size. Chunks stay small (an even share per thread, at most
`max_chunk`): a thread that took everything waiting would keep the others idle and hold back,
until its last item, results the batcher is waiting for.

Each item keeps its own result or exception (one bad image fails only its own request) and
its own compute time. Items whose caller went away before a thread took them are skipped.
decode_threads() below makes the server's decode pool.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import numpy as np

from snaplearn_common import errors

ArgT = TypeVar("ArgT")
ResultT = TypeVar("ResultT")

# Per item: (ok, result or the exception, seconds it took).
Outcome = tuple[bool, object, float]


@dataclass(slots=True)
class _Item(Generic[ArgT, ResultT]):
    argument: ArgT
    future: asyncio.Future[tuple[ResultT, float]]


def take_even_share(
    waiting: collections.deque[_Item[ArgT, ResultT]], threads: int, max_chunk: int
) -> list[_Item[ArgT, ResultT]]:
    """An even share of what waits, per thread, at most max_chunk; callers gone are skipped."""
    size = min(max_chunk, math.ceil(len(waiting) / threads))
    chunk: list[_Item[ArgT, ResultT]] = []
    while waiting and len(chunk) < size:
        item = waiting.popleft()
        if not item.future.done():  # its caller went away while it waited
            chunk.append(item)
    return chunk


def settle(chunk: Sequence[_Item[ArgT, ResultT]], outcomes: Sequence[Outcome]) -> None:
    """Each item's future gets its own (result, seconds) or exception; one per item, in order."""
    for item, (ok, value, seconds) in zip(chunk, outcomes, strict=True):
        if item.future.done():
            continue
        if ok:
            item.future.set_result((value, seconds))  # type: ignore[arg-type]
        else:
            assert isinstance(value, BaseException)
            item.future.set_exception(value)


class ChunkedPool(Generic[ArgT, ResultT]):
    """`await pool.run(argument)` -> (function(argument), seconds it took on its thread).

    Create and use it on one event loop; `start()` from that loop, `stop()` at the end.
    """

    def __init__(
        self,
        function: Callable[[ArgT], ResultT],
        threads: int,
        *,
        name: str = "decode",
        initializer: Callable[[], None] | None = None,
        max_chunk: int = 8,
    ) -> None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        if max_chunk < 1:
            raise ValueError(f"max_chunk must be >= 1, got {max_chunk}")
        self._function = function
        self._threads = threads
        self._name = name
        self._initializer = initializer
        self._max_chunk = max_chunk
        self._waiting: collections.deque[_Item[ArgT, ResultT]] = collections.deque()
        self._busy = 0  # chunks handed to threads and not reported back yet
        self._executor: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.chunks = 0  # hand-offs so far (for tests and debugging)
        self.items = 0  # items run so far
        self.largest_chunk = 0

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._executor = ThreadPoolExecutor(
            max_workers=self._threads, thread_name_prefix=self._name, initializer=self._initializer
        )

    async def run(self, argument: ArgT) -> tuple[ResultT, float]:
        if self._executor is None or self._loop is None:
            raise errors.Unavailable(f"{self._name} pool is not running")
        future: asyncio.Future[tuple[ResultT, float]] = self._loop.create_future()
        self._waiting.append(_Item(argument, future))
        if self._busy < self._threads:
            self._hand_off()
        return await future  # cancelled: the item is skipped if no thread took it yet

    async def stop(self, drain: bool = True) -> None:
        """Join the threads (off the loop); what still waits for a thread fails with Unavailable.

        drain=True lets the chunks already handed to threads finish first (callers that drain
        wait for their own requests before stopping the pool, so nothing is left waiting).
        """
        executor, self._executor = self._executor, None
        while self._waiting:
            item = self._waiting.popleft()
            if not item.future.done():
                item.future.set_exception(errors.Unavailable(f"{self._name} pool is shutting down"))
        if executor is not None:
            # In a thread: a chunk may still be running and the event loop must not wait on it.
            await asyncio.to_thread(executor.shutdown, wait=drain)

    # -- on the event loop -----------------------------------------------------------------

    def _hand_off(self) -> None:
        """Give the next chunk to a free thread: an even share of what waits, per thread."""
        if self._executor is None:
            return
        chunk = take_even_share(self._waiting, self._threads, self._max_chunk)
        if not chunk:
            return
        self._busy += 1
        self.chunks += 1
        self.items += len(chunk)
        self.largest_chunk = max(self.largest_chunk, len(chunk))
        arguments = [item.argument for item in chunk]
        self._executor.submit(self._run_chunk, chunk, arguments)

    def _report(self, chunk: list[_Item[ArgT, ResultT]], outcomes: list[Outcome]) -> None:
        self._busy -= 1
        settle(chunk, outcomes)
        while self._waiting and self._busy < self._threads:
            before = len(self._waiting)
            self._hand_off()
            if len(self._waiting) == before:
                break

    # -- on a pool thread ------------------------------------------------------------------

    def _run_chunk(self, chunk: list[_Item[ArgT, ResultT]], arguments: list[ArgT]) -> None:
        outcomes: list[Outcome] = []
        function = self._function
        for argument in arguments:
            started = time.perf_counter()
            try:
                outcomes.append((True, function(argument), time.perf_counter() - started))
            except Exception as exc:  # handed to that item's caller, on the loop
                outcomes.append((False, exc, time.perf_counter() - started))
        assert self._loop is not None
        # RuntimeError: the loop closed under us (interpreter shutdown) and nobody waits.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._report, chunk, outcomes)


# -- the server's decode pool ----------------------------------------------------------------


class Decodable(Protocol):
    """A served model as a decode thread sees it (engine.ImageClassifier)."""

    def decode_pixels(self, image_bytes: bytes) -> np.ndarray: ...


DecodeJob = tuple[Decodable, bytes]
DecodePool = ChunkedPool[DecodeJob, np.ndarray]


def lower_priority(niceness: int) -> Callable[[], None]:
    """A thread initializer for the decode threads: lower the thread's scheduling priority.

    When the decode threads keep every core busy, the event loop thread, which answers
    refusals and hands results back, must still get a core at once: a decode that waits a
    little costs little throughput, a starved event loop makes every answer late. The model
    thread is not niced: it is one thread (one core at most, so it cannot crowd out the loop,
    which the scheduler favours anyway as it mostly sleeps), it is the bottleneck for real-size
    models, and a niced thread yields to every other process on a shared machine too.
    On Linux the nice value is per thread; where it cannot be changed nothing happens.
    """

    def initializer() -> None:
        if niceness <= 0:
            return
        with contextlib.suppress(OSError, AttributeError):
            thread = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, thread, os.getpriority(os.PRIO_PROCESS, thread) + niceness)

    return initializer


def _decode_job(job: DecodeJob) -> np.ndarray:
    model, image_bytes = job
    return model.decode_pixels(image_bytes)


def decode_threads(threads: int, niceness: int, *, name: str = "vision-decode") -> DecodePool:
    """Photos decoded on `threads` threads of the server process, `niceness` below the rest."""
    return ChunkedPool(_decode_job, threads, name=name, initializer=lower_priority(niceness))
