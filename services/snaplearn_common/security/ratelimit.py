"""A token bucket per caller. No gRPC here: the interceptor answers RESOURCE_EXHAUSTED.

RateLimiter keeps the buckets in this process. Worker processes behind one port
(`snaplearn-vision --workers N`) share one SharedRateLimiter table instead: the kernel spreads
a caller's connections over the workers, so buckets per process would let a caller make N
times its rate (docs/DECISIONS.md, D51).
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Protocol


class Limiter(Protocol):
    """What the interceptor needs of a limiter."""

    rate_per_s: float

    def take(self, key: str) -> float:
        """0.0 when the call may go (one token taken), else the seconds until it could."""
        ...


def _check(rate_per_s: float, burst: int) -> None:
    if rate_per_s <= 0 or burst < 1:
        raise ValueError("rate_per_s must be > 0 and burst >= 1")


def _take_from(tokens: float, at: float, now: float, rate_per_s: float, burst: float) -> tuple[float, float]:
    """(wait, tokens left) for one call on a bucket that held `tokens` at time `at`."""
    tokens = min(burst, tokens + max(0.0, now - at) * rate_per_s)
    if tokens >= 1.0:
        return 0.0, tokens - 1.0
    return (1.0 - tokens) / rate_per_s, tokens


class RateLimiter:
    """`rate_per_s` calls a second per key, `burst` at once. take() returns 0.0 when the call
    may go, else the seconds until it could. Buckets of callers not seen for a while are
    dropped (least recently used first) so that many callers cannot grow memory unbounded."""

    def __init__(
        self,
        rate_per_s: float,
        burst: int,
        *,
        max_callers: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        _check(rate_per_s, burst)
        self.rate_per_s = rate_per_s
        self.burst = float(burst)
        self._max_callers = max_callers
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, at)

    def take(self, key: str) -> float:
        now = self._clock()
        tokens, at = self._buckets.pop(key, (self.burst, now))
        wait, tokens = _take_from(tokens, at, now, self.rate_per_s, self.burst)
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > self._max_callers:
            self._buckets.popitem(last=False)
        return wait


_MAGIC = b"SLRLIMv1"
_HEADER = struct.Struct("<8sI4x")  # magic, slot count
_SLOT = struct.Struct("<Qdd")  # caller key hash (0: empty), tokens, at (CLOCK_MONOTONIC seconds)
DEFAULT_SLOTS = 65_536
_PROBE = 8  # slots looked at per caller: its own is one of these


def _key_hash(key: str) -> int:
    digest = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    return digest or 1  # 0 marks an empty slot


class SharedRateLimiter:
    """The same token buckets for every process that opens one table file.

    The file is a fixed table of slots (caller hash, tokens, time), mapped into each process;
    each take() holds an exclusive flock on the file for one read-modify-write of one slot,
    so concurrent calls in different processes take from one bucket. time.monotonic
    (CLOCK_MONOTONIC) is one clock for all processes of a machine, so a bucket refilled by
    one process's clock is read correctly by another's.

    A caller's slot is one of a few after its hash. A slot whose bucket has refilled to
    `burst` is as good as empty and is reused; only when all of them hold callers still
    limited is the least recently used one taken over (that caller then starts from a full
    bucket, as one forgotten by RateLimiter does).
    """

    def __init__(
        self,
        path: Path,
        rate_per_s: float,
        burst: int,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        _check(rate_per_s, burst)
        self.rate_per_s = rate_per_s
        self.burst = float(burst)
        self._clock = clock
        self._fd = os.open(path, os.O_RDWR)
        try:
            size = os.fstat(self._fd).st_size
            if size < _HEADER.size:
                raise ValueError(f"{path.name} is not a rate-limit table")
            self._map = mmap.mmap(self._fd, size)
        except BaseException:
            os.close(self._fd)
            raise
        magic, slots = _HEADER.unpack_from(self._map, 0)
        if magic != _MAGIC or size != _HEADER.size + slots * _SLOT.size:
            self.close()
            raise ValueError(f"{path.name} is not a rate-limit table")
        self._slots = slots
        self._thread_lock = threading.Lock()  # flock is per open file, not per thread

    @staticmethod
    def create(path: Path, slots: int = DEFAULT_SLOTS) -> Path:
        """Write an empty table of `slots` slots at `path` (replacing what was there)."""
        if slots < _PROBE:
            raise ValueError(f"a rate-limit table needs at least {_PROBE} slots")
        temp = path.with_name(path.name + ".tmp")
        with open(temp, "wb") as file:
            file.write(_HEADER.pack(_MAGIC, slots))
            file.truncate(_HEADER.size + slots * _SLOT.size)  # zeros: every slot empty
        os.replace(temp, path)
        return path

    def take(self, key: str) -> float:
        wanted = _key_hash(key)
        start = wanted % self._slots
        with self._thread_lock:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                now = self._clock()  # under the lock: times written to the table only grow
                own = free = oldest = None
                oldest_at = float("inf")
                for step in range(_PROBE):
                    offset = _HEADER.size + ((start + step) % self._slots) * _SLOT.size
                    held, tokens, at = _SLOT.unpack_from(self._map, offset)
                    if held == wanted:
                        own = (offset, tokens, at)
                        break
                    full = held == 0 or tokens + max(0.0, now - at) * self.rate_per_s >= self.burst
                    if full and free is None:
                        free = offset
                    elif not full and at < oldest_at:
                        oldest, oldest_at = offset, at
                if own is not None:
                    offset, tokens, at = own
                else:
                    chosen = free if free is not None else oldest
                    assert chosen is not None
                    offset, tokens, at = chosen, self.burst, now
                wait, tokens = _take_from(tokens, at, now, self.rate_per_s, self.burst)
                _SLOT.pack_into(self._map, offset, wanted, tokens, now)
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        return wait

    def close(self) -> None:
        if getattr(self, "_map", None) is not None:
            self._map.close()
        os.close(self._fd)
