"""Decode processes fed from the event loop: photos waiting are shared out in small chunks.

The same contract as ChunkedPool (decode_pool.py), for `--decoder processes`: `await
pool.run((model, image_bytes))` -> (pixels, seconds the decode took); each photo keeps its own
result or error; a caller gone before its photo was sent is skipped; stop() fails what still
waits with Unavailable. A runner task per process takes an even share of what waits (at most
`max_chunk`) whenever its process is free, so under light load a chunk is one photo and under
load the pipe round trips per photo fall towards 1/chunk.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from snaplearn_common import errors
from snaplearn_vision.chunking import settle, take_even_share
from snaplearn_vision.decode_process import DecodeProcess, HasDecodeSpec

log = logging.getLogger(__name__)

Job = tuple[HasDecodeSpec, bytes]


@dataclass(slots=True)
class _Item:
    job: Job
    future: asyncio.Future[tuple[np.ndarray, float]]


class ProcessPool:
    """`processes` decode processes (`niceness` below the server) and a runner task for each.

    Create, start() and use it on one event loop; stop() at the end.
    """

    def __init__(
        self,
        processes: int,
        niceness: int = 0,
        *,
        name: str = "decode",
        max_chunk: int = 8,
        on_restart: Callable[[], None] | None = None,
    ) -> None:
        if processes < 1:
            raise ValueError(f"processes must be >= 1, got {processes}")
        if max_chunk < 1:
            raise ValueError(f"max_chunk must be >= 1, got {max_chunk}")
        self._name = name
        self._max_chunk = max_chunk
        self.decoders = [
            DecodeProcess(niceness, name=f"{name}-{index}", on_restart=on_restart)
            for index in range(processes)
        ]
        self._waiting: collections.deque[_Item] = collections.deque()
        self._work = asyncio.Event()  # set while photos wait (or to wake the runners to stop)
        self._runners: list[asyncio.Task[None]] = []
        self._running = False
        self.chunks = 0  # chunks sent so far (for tests and debugging)
        self.items = 0
        self.largest_chunk = 0

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def start(self) -> None:
        """From the event loop: start the processes (each runner starts its own) and serve."""
        self._running = True
        self._runners = [
            asyncio.create_task(self._serve(decoder), name=f"{self._name}-runner-{index}")
            for index, decoder in enumerate(self.decoders)
        ]

    async def run(self, job: Job) -> tuple[np.ndarray, float]:
        if not self._running:
            raise errors.Unavailable(f"{self._name} pool is not running")
        future: asyncio.Future[tuple[np.ndarray, float]] = asyncio.get_running_loop().create_future()
        self._waiting.append(_Item(job, future))
        self._work.set()
        return await future  # cancelled: the photo is skipped if no runner took it yet

    async def stop(self, drain: bool = True) -> None:
        """Fail what waits with Unavailable; let (drain) or not the chunks being decoded finish."""
        self._running = False
        while self._waiting:
            item = self._waiting.popleft()
            if not item.future.done():
                item.future.set_exception(errors.Unavailable(f"{self._name} pool is shutting down"))
        self._work.set()  # the idle runners see that the pool stopped
        if not drain:
            await asyncio.gather(*(decoder.retire(kill=True) for decoder in self.decoders))
        await asyncio.gather(*self._runners, return_exceptions=True)
        await asyncio.gather(*(decoder.retire() for decoder in self.decoders))

    async def _serve(self, decoder: DecodeProcess) -> None:
        try:
            await decoder.start()
        except OSError as error:  # decode() starts it again on its first chunk, or says why not
            log.warning("%s: cannot start a decode process (%s)", self._name, error)
        while True:
            while self._running and not self._waiting:
                self._work.clear()
                await self._work.wait()
            if not self._running:
                return
            chunk = self._take_chunk()
            if not chunk:
                continue
            try:
                outcomes = await decoder.decode([item.job for item in chunk])
                if len(outcomes) != len(chunk):
                    raise RuntimeError(f"{len(outcomes)} outcomes for {len(chunk)} photos")
            except Exception as exc:  # a bug of ours: every photo of the chunk hears of it
                log.exception("%s: a chunk failed", self._name)
                outcomes = [(False, exc, 0.0)] * len(chunk)
            settle(chunk, outcomes)

    def _take_chunk(self) -> list[_Item]:
        chunk = take_even_share(self._waiting, len(self.decoders), self._max_chunk)
        if chunk:
            self.chunks += 1
            self.items += len(chunk)
            self.largest_chunk = max(self.largest_chunk, len(chunk))
        return chunk
