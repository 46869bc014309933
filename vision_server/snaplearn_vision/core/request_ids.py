"""Request ids for calls that bring none: UUID-shaped, unique, and cheap to make.

`str(uuid.uuid4())` costs a getrandom() system call and a UUID object per request, on the
event loop that answers every call. Here the random part is drawn once per process and a
counter fills the last 48 bits: ids never repeat within a process (2^48 calls), and two
processes share a prefix with probability about 2^-74. The ids keep the UUID version 4 layout,
so whatever parses them as UUIDs (event consumers, log tooling) still can; they are not secret.
"""

from __future__ import annotations

import itertools
import os


class RequestIds:
    def __init__(self) -> None:
        random = bytearray(os.urandom(10))
        random[6] = (random[6] & 0x0F) | 0x40  # version 4
        random[8] = (random[8] & 0x3F) | 0x80  # RFC 4122 variant
        hex_digits = random.hex()
        self._prefix = f"{hex_digits[:8]}-{hex_digits[8:12]}-{hex_digits[12:16]}-{hex_digits[16:20]}-"
        self._counter = itertools.count()

    def next(self) -> str:
        return f"{self._prefix}{next(self._counter) & 0xFFFFFFFFFFFF:012x}"
