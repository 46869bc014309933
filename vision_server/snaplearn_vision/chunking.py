"""What both decode pools (threads: decode_pool.ChunkedPool, processes: process_pool.ProcessPool)
do with the photos waiting for a decoder: take an even share, and settle each one's future."""

from __future__ import annotations

import asyncio
import collections
import math
from collections.abc import Sequence
from typing import Any, Protocol, TypeVar


class Waiting(Protocol):
    @property
    def future(self) -> asyncio.Future[Any]: ...


ItemT = TypeVar("ItemT", bound=Waiting)

# Per item: (ok, result or the exception, seconds it took).
Outcome = tuple[bool, object, float]


def take_even_share(waiting: collections.deque[ItemT], decoders: int, max_chunk: int) -> list[ItemT]:
    """An even share of what waits, per decoder, at most max_chunk; callers gone are skipped.

    A decoder that took everything waiting would keep the others idle and hold back, until
    its last item, results the batcher is waiting for.
    """
    size = min(max_chunk, math.ceil(len(waiting) / decoders))
    chunk: list[ItemT] = []
    while waiting and len(chunk) < size:
        item = waiting.popleft()
        if not item.future.done():  # its caller went away while it waited
            chunk.append(item)
    return chunk


def settle(chunk: Sequence[Waiting], outcomes: Sequence[Outcome]) -> None:
    """Each item's future gets its own (result, seconds) or exception; one per item, in order."""
    for item, (ok, value, seconds) in zip(chunk, outcomes, strict=True):
        if item.future.done():
            continue
        if ok:
            item.future.set_result((value, seconds))
        else:
            assert isinstance(value, BaseException)
            item.future.set_exception(value)
