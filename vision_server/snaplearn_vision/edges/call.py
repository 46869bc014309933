"""The one wrapper every classification call goes through at the gRPC edge.

Classify, each ClassifyStream item and ModelInfer all need the same three things: a deadline
on the core's clock, the domain error turned into a gRPC status (through the one table,
snaplearn_common.grpc_errors), and the call counted in the request metrics by that status.
`observed` does all three; the edges only differ in how they deliver a Failed (a unary call
sets its status, a stream item becomes a per-item result). An error that says when to retry
(a model still loading: `retry_after_s`) gives a unary call the `grpc-retry-pushback-ms` trailer
too, the key gRPC's retry policy honours; a stream item has it in its message only.
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
# gRPC's retry design (A6): a server's "retry after this many milliseconds", as a trailer. The
# security interceptor's rate limit sends the same key (snaplearn_common.security.interceptor).
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"


class RequestMetrics(Protocol):
    """snaplearn_vision.core.metrics.VisionMetrics, as the edge sees it."""

    def observe_request(self, code: str, seconds: float) -> None: ...


@dataclass(frozen=True, slots=True)
class Failed:
    """A call that ended with a status other than OK, and the message its client reads."""

    status: grpc.StatusCode
    message: str
    retry_after_ms: int | None = None  # when the client may retry (grpc-retry-pushback-ms)


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
        outcome = Failed(status_for(exc), str(exc), retry_after_ms(exc))
    except Exception:
        log.exception("unexpected error in %s", method)
        outcome = Failed(grpc.StatusCode.INTERNAL, f"internal error in {method}; see server logs")
    code = outcome.status.name if isinstance(outcome, Failed) else "OK"
    metrics.observe_request(code, time.monotonic() - started)
    return outcome


def retry_after_ms(error: BaseException) -> int | None:
    """The retry hint an error carries (`retry_after_s`, e.g. a model loading), in milliseconds."""
    seconds = getattr(error, "retry_after_s", None)
    return max(0, round(seconds * 1000)) if isinstance(seconds, (int, float)) else None


def set_retry_pushback(context: aio.ServicerContext, milliseconds: int | None) -> None:
    """The grpc-retry-pushback-ms trailer, for a call that ends with a status saying when to retry."""
    if milliseconds is not None:
        context.set_trailing_metadata(((RETRY_PUSHBACK_KEY, str(milliseconds)),))


def reply_failed(context: aio.ServicerContext, failed: Failed, empty: ResponseT) -> ResponseT:
    """A unary call's failure as its status; the message is discarded by gRPC.

    Setting the status instead of raising keeps the hot error path (RESOURCE_EXHAUSTED under
    overload) cheap: context.abort() raises once more inside gRPC, which costs the event loop
    more than setting the status.
    """
    context.set_code(failed.status)
    context.set_details(failed.message)
    set_retry_pushback(context, failed.retry_after_ms)
    return empty
