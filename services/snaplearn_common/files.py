"""Writing files that readers and crashes never see half-written.

`atomic_write` writes a temporary file next to the target, fsyncs it, renames it over the
target and fsyncs the directory, so that after a crash the path holds either the old
content or the new one. `write_ready_file` is the JSON file a server writes once it serves
(its ports and pid), which supervisors, the launcher and tests wait for.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Mapping
from pathlib import Path

__all__ = ["atomic_write", "fsync_directory", "write_ready_file"]


def atomic_write(
    path: str | os.PathLike[str], data: bytes | str, *, durable: bool = True, mode: int = 0o666
) -> None:
    """Replace `path`'s content with `data` (str is written as UTF-8) in one step.

    durable: fsync the file and then its directory, so the new content survives a power loss;
    False still protects readers from a half-written file, and a crash of the process.
    mode: the permissions of a new file, less the umask (as for open()).
    """
    target = Path(path)
    content = data.encode() if isinstance(data, str) else data
    # A name of its own per call: concurrent writers of one path never share a temporary file.
    temporary = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(content)
            out.flush()
            if durable:
                os.fsync(out.fileno())
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    if durable:
        fsync_directory(target.parent)


def fsync_directory(directory: str | os.PathLike[str]) -> None:
    """Make a directory's entries (a create, rename or unlink in it) durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_ready_file(path: str | os.PathLike[str], payload: Mapping[str, object]) -> None:
    """Write `payload` as one line of JSON to `path` (creating its folder), atomically.

    Every server's ready file has host, port, metrics_port and pid; a supervisor's adds its
    workers. Readers poll for the file and parse it as soon as it exists.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, json.dumps(dict(payload)) + "\n")
