"""What a worker process (one of `--workers N`, started by the supervisor) does for itself."""

from __future__ import annotations

import logging
import os
import signal
import sys

log = logging.getLogger(__name__)

# Set by the supervisor in each worker's environment.
SUPERVISOR_PID_ENV = "SNAPLEARN_VISION_SUPERVISOR_PID"

_PR_SET_PDEATHSIG = 1


def supervisor_pid() -> int:
    """The supervisor this worker reports to (its parent unless the environment names one)."""
    return int(os.environ.get(SUPERVISOR_PID_ENV, os.getppid()))


def stop_with_parent(expected_parent: int) -> None:
    """Linux: a worker gets SIGTERM (and drains) when its supervisor dies, even by SIGKILL,
    rather than serve unwatched. Elsewhere a no-op."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    if os.getppid() != expected_parent:  # the supervisor died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)
