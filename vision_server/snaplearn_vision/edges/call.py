"""The one wrapper every classification call goes through at the gRPC edge.

Classify, each ClassifyStream item and ModelInfer all need the same three things: a deadline
on the core's clock, the domain error turned into a gRPC status (through the one table,
snaplearn_common.grpc_errors), and the call counted in the request metrics by that status.
`observed` does all three; the edges only differ in how they deliver a Failed (a unary call
sets its status, a stream item becomes a per-item result).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Protocol, TypeVar

import grpc
from grpc import aio

from snaplearn_common.errors import SnapLearnError
from snaplearn_common.grpc_errors import status_for

log = logging.getLogger(__name__)

T = TypeVar("T")
ResponseT = TypeVar("ResponseT")


class RequestMetrics(Protocol):
    """snaplearn_vision.core.metrics.VisionMetrics, as the edge sees it."""

    def observe_request(self, code: str, seconds: float) -> None: ...


@dataclass(frozen=True, slots=True)
class Failed:
    """A call that ended with a status other than OK, and the message its client reads."""

    status: grpc.StatusCode
    message: str


def unary_deadline(context: aio.ServicerContext, now: float) -> float | None:
    """The call's deadline on time.monotonic()'s clock (the core's), or None for none."""
    remaining_s = context.time_remaining()
    return now + remaining_s if remaining_s is not None else None


def cancelled_status(deadline: float | None) -> grpc.StatusCode:
    """Why a call's work was cancelled: its deadline passed, or its client went away."""
    if deadline is not None and time.monotonic() >= deadline:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


async def observed(
    metrics: RequestMetrics, work: Awaitable[T], *, started: float, deadline: float | None, method: str
) -> T | Failed:
    """Await `work`; a domain error (or a bug) comes back as a Failed, and every outcome,
    cancellation included, is counted by its status name.

    Cancellation propagates: gRPC cancels a unary handler when its client goes away or its
    deadline passes, and a stream cancels an item's task; cancelled_status says which.
    """
    outcome: T | Failed
    try:
        outcome = await work
    except asyncio.CancelledError:
        metrics.observe_request(cancelled_status(deadline).name, time.monotonic() - started)
        raise
    except SnapLearnError as exc:
        outcome = Failed(status_for(exc), str(exc))
    except Exception:
        log.exception("unexpected error in %s", method)
        outcome = Failed(grpc.StatusCode.INTERNAL, f"internal error in {method}; see server logs")
    code = outcome.status.name if isinstance(outcome, Failed) else "OK"
    metrics.observe_request(code, time.monotonic() - started)
    return outcome


def reply_failed(context: aio.ServicerContext, failed: Failed, empty: ResponseT) -> ResponseT:
    """A unary call's failure as its status; the message is discarded by gRPC.

    Setting the status instead of raising keeps the hot error path (RESOURCE_EXHAUSTED under
    overload) cheap: context.abort() raises once more inside gRPC, which costs the event loop
    more than setting the status.
    """
    context.set_code(failed.status)
    context.set_details(failed.message)
    return empty
