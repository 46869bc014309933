"""A decode process: photos in over its stdin, pixels out over its stdout, in chunks.

Why processes: in the server process a decode shares one GIL with the event loop and the model
thread. Measured (benchmarks/vision_gil.py, D25), a 0.2 ms decode beside a busy Python thread
takes 3.2 ms of wall time at the server's 1 ms switch interval, and the two decode threads cost
~480 us of CPU per photo inside a loaded server against ~200 us alone. A process of its own
decodes at its standalone cost; the server's event loop only writes and reads bytes.

The process imports decoding.py alone (Pillow and numpy, no torch): it starts in a fraction of a
second. Its parent is the server's event loop (DecodeProcess below); when the server goes away
its stdin closes and it exits. It ignores SIGINT: Ctrl-C reaches the whole
process group, and the server, not its decoders, decides when decoding stops.

Wire format (little-endian; READY once started, then one request frame per chunk and one reply
frame per item, in order):
  request  u32 count, then per item: u8 channels, u16 height, u16 width, u64 max_image_bytes,
           u64 max_image_pixels, u32 length, `length` bytes of the encoded photo
  reply    u8 status, f64 seconds the decode took, u32 length, `length` bytes: the pixels
           (uint8 H*W*C) for OK, else a UTF-8 message (INVALID: for the client; FAILED: the
           error's type name, a newline, the traceback, for the server's log)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import struct
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import IO, Protocol

import numpy as np

from snaplearn_common.errors import InvalidInput, Unavailable
from snaplearn_vision.chunking import Outcome
from snaplearn_vision.decoding import DecodeSpec, decode_pixels

log = logging.getLogger(__name__)

_COUNT = struct.Struct("<I")
_ITEM = struct.Struct("<BHHQQI")
_REPLY = struct.Struct("<BdI")
OK, INVALID, FAILED = 0, 1, 2
PIPE_BYTES = 1 << 20
# How long a decoder may take to exit once its stdin is closed before it is killed.
EXIT_GRACE_S = 5.0
# The longest one photo may take to decode before its decoder is killed and the photo refused:
# a 48-megapixel PNG takes ~0.4 s here; a crafted progressive JPEG can keep libjpeg busy for
# minutes (a decode thread could never be stopped; a process can).
DEFAULT_DECODE_TIMEOUT_S = 10.0
START_TIMEOUT_S = 60.0
READY = b"SNAPLEARN-DECODER-READY\n"  # its first bytes on stdout, once it can decode


class DecoderFailed(RuntimeError):
    """The decoder raised something other than InvalidInput; type_name is the original's."""

    def __init__(self, type_name: str, details: str) -> None:
        super().__init__(f"{type_name} in a decode process:\n{details}")
        self.type_name = type_name


class DecoderDied(RuntimeError):
    """The decode process exited (or closed its pipes, or was killed for taking too long)."""

    def __init__(self, reason: str, timed_out: bool = False) -> None:
        super().__init__(reason)
        self.timed_out = timed_out


class HasDecodeSpec(Protocol):
    """A served model as a decode process sees it (decode_pool.Decodable adds decode_pixels)."""

    @property
    def decode_spec(self) -> DecodeSpec: ...


def _read_exactly(stream: IO[bytes], size: int) -> bytes:
    data = stream.read(size)
    if data is None or len(data) != size:
        raise EOFError(f"wanted {size} bytes, got {0 if data is None else len(data)}")
    return data


# -- the parent's side ---------------------------------------------------------------------


class DecodeProcess:
    """One decode process and the pipes to it, driven from the event loop (asyncio streams).

    No thread of the server touches it: the loop writes a chunk's frame to its stdin and reads
    the replies as they arrive, as it reads a socket. (A first version fed each process from a
    thread of its own; those threads cost as much CPU per photo as the GIL-free decode saved.)

    decode() sends a chunk and waits for its replies; one chunk at a time. If the process
    dies under a chunk, or takes longer than decode_timeout_s for one photo (it is killed), it
    is started again and each photo of the chunk retried alone, once: a photo that kills (or
    outlasts) a fresh decoder on its own is the cause and is refused (INVALID_ARGUMENT);
    the others (say the process was killed for memory by something else) are decoded as if
    nothing happened. Nothing is lost and one hostile photo cannot take the server down.
    """

    def __init__(
        self,
        niceness: int = 0,
        *,
        name: str = "decode",
        on_restart: Callable[[], None] | None = None,
        decode_timeout_s: float = DEFAULT_DECODE_TIMEOUT_S,
    ) -> None:
        if decode_timeout_s <= 0:
            raise ValueError(f"decode_timeout_s must be > 0, got {decode_timeout_s}")
        self._niceness = niceness
        self._name = name
        self._decode_timeout_s = decode_timeout_s
        self._on_restart = on_restart  # e.g. a metric's inc
        self._process: asyncio.subprocess.Process | None = None
        self._retired = False
        self._dead = True  # until started; and from the moment an exchange with it fails
        self.restarts = 0  # for tests and the log

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    async def start(self) -> None:
        if self._retired:
            raise Unavailable("the decode processes are shutting down; retry shortly")
        # stderr is inherited: the decoder's own warnings go to the server's log stream.
        self._process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "snaplearn_vision.decode_process",
            "--niceness",
            str(self._niceness),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        # Its imports take a fraction of a second: that is not a photo's decode time.
        assert self._process.stdout is not None
        try:
            async with asyncio.timeout(START_TIMEOUT_S):
                ready = await self._process.stdout.readexactly(len(READY))
        except (TimeoutError, asyncio.IncompleteReadError):
            ready = b""
        if ready != READY:
            with contextlib.suppress(ProcessLookupError):
                self._process.kill()
            raise OSError(f"the decode process did not start within {START_TIMEOUT_S:g} s")
        self._dead = False

    async def retire(self, kill: bool = False) -> None:
        """Stop it for good: a chunk still running gets UNAVAILABLE instead of a new process.

        kill=False lets it answer the chunk it has first (it exits when its stdin closes).
        """
        self._retired = True
        if kill and self._process is not None and self._process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._process.kill()
        await self._close()

    async def _close(self) -> None:
        """Close its stdin: it answers what it has and exits (killed if it lingers)."""
        process = self._process
        if process is None:
            return
        if process.stdin is not None and not process.stdin.is_closing():
            process.stdin.close()
        try:
            await asyncio.wait_for(process.wait(), EXIT_GRACE_S)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()

    async def decode(self, jobs: Sequence[tuple[HasDecodeSpec, bytes]]) -> list[Outcome]:
        try:
            return await self._exchange(jobs)
        except DecoderDied as died:
            if not self._retired:
                log.warning(
                    "%s: decode process died (%s); retrying %d photos alone", self._name, died, len(jobs)
                )
            return [await self._retry_alone(job) for job in jobs]

    async def _retry_alone(self, job: tuple[HasDecodeSpec, bytes]) -> Outcome:
        try:
            if self._dead:
                await self._close()
                await self.start()
                self.restarts += 1
                if self._on_restart is not None:
                    self._on_restart()
            return (await self._exchange([job]))[0]
        except Unavailable as error:
            return (False, error, 0.0)
        except OSError as error:
            return (False, Unavailable(f"cannot start a decode process ({error}); retry shortly"), 0.0)
        except DecoderDied as died:
            if self._retired:
                return (False, Unavailable("the decode processes are shutting down; retry shortly"), 0.0)
            if died.timed_out:
                log.warning(
                    "%s: a photo took over %g s to decode on its own; refused",
                    self._name,
                    self._decode_timeout_s,
                )
                message = f"image could not be decoded: it took longer than {self._decode_timeout_s:g} s"
                return (False, InvalidInput(message), self._decode_timeout_s)
            log.warning("%s: a photo crashed a fresh decode process on its own; refused", self._name)
            return (False, InvalidInput("image could not be decoded: it crashed the decoder"), 0.0)

    async def _exchange(self, jobs: Sequence[tuple[HasDecodeSpec, bytes]]) -> list[Outcome]:
        process = self._process
        if self._dead or process is None or process.stdin is None or process.stdout is None:
            raise DecoderDied("not running")
        try:
            process.stdin.write(request_frame(jobs))
            await process.stdin.drain()
            outcomes: list[Outcome] = []
            for model, _ in jobs:
                # Each photo's reply within the timeout (a deadline per photo, not per chunk).
                async with asyncio.timeout(self._decode_timeout_s):
                    header = await process.stdout.readexactly(_REPLY.size)
                status, seconds, length = _REPLY.unpack(header)
                payload = await process.stdout.readexactly(length)
                outcomes.append(_outcome(status, seconds, payload, model.decode_spec))
            return outcomes
        except TimeoutError:
            self._dead = True
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            raise DecoderDied(f"a photo took over {self._decode_timeout_s:g} s", timed_out=True) from None
        except (OSError, asyncio.IncompleteReadError) as error:
            self._dead = True
            code = process.returncode
            raise DecoderDied(f"exit code {code}" if code is not None else type(error).__name__) from None


def request_frame(jobs: Sequence[tuple[HasDecodeSpec, bytes]]) -> bytes:
    frame = [_COUNT.pack(len(jobs))]
    for model, image_bytes in jobs:
        spec = model.decode_spec
        frame.append(
            _ITEM.pack(
                spec.channels,
                spec.height,
                spec.width,
                spec.max_image_bytes,
                spec.max_image_pixels,
                len(image_bytes),
            )
        )
        frame.append(image_bytes)
    return b"".join(frame)


def _outcome(status: int, seconds: float, payload: bytes, spec: DecodeSpec) -> Outcome:
    if status == OK:
        # A read-only view of the received bytes: the batcher copies it into its batch buffer.
        return (True, np.frombuffer(payload, dtype=np.uint8).reshape(spec.shape), seconds)
    message = payload.decode("utf-8", errors="replace")
    if status == INVALID:
        return (False, InvalidInput(message), seconds)
    type_name, _, details = message.partition("\n")
    return (False, DecoderFailed(type_name, details), seconds)


# -- the decode process's side ------------------------------------------------------------


def serve(requests: IO[bytes], replies: IO[bytes]) -> None:
    """Answer chunks until the requests stream ends."""
    while True:
        header = requests.read(_COUNT.size)
        if not header:
            return
        (count,) = _COUNT.unpack(header)
        jobs = []
        for _ in range(count):
            channels, height, width, max_bytes, max_pixels, length = _ITEM.unpack(
                _read_exactly(requests, _ITEM.size)
            )
            spec = DecodeSpec(channels, height, width, max_bytes, max_pixels)
            jobs.append((spec, _read_exactly(requests, length)))
        for spec, image_bytes in jobs:
            started = time.perf_counter()
            try:
                payload = decode_pixels(spec, image_bytes).tobytes()
                status = OK
            except InvalidInput as error:
                payload, status = str(error).encode(), INVALID
            except Exception as error:  # the parent logs it and refuses the photo
                payload = f"{type(error).__name__}\n{traceback.format_exc()}".encode()
                status = FAILED
            replies.write(_REPLY.pack(status, time.perf_counter() - started, len(payload)))
            replies.write(payload)
        replies.flush()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A SnapLearn decode process (started by the vision server).")
    parser.add_argument("--niceness", type=int, default=0, help="lower this process's priority by this much")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A chunk of mobilenet-sized pixels is 150 KB a photo: with Linux's 64 KB pipes the decoder
    # would block on every 64 KB until the server's loop woke up to read it. 1 MB is what an
    # unprivileged process may ask for; where it cannot, the pipes stay as they are.
    for descriptor in (0, 1):
        with contextlib.suppress(OSError, AttributeError):
            fcntl.fcntl(descriptor, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
    if args.niceness > 0:
        with contextlib.suppress(OSError):
            os.nice(args.niceness)
    # The replies go to the stdout the parent reads; anything else printing to stdout (a
    # library's stray print) would corrupt them, so fd 1 becomes stderr from here on.
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    with contextlib.suppress(BrokenPipeError), replies:
        replies.write(READY)
        replies.flush()
        serve(sys.stdin.buffer, replies)


if __name__ == "__main__":
    main()
