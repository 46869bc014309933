"""ClassifyStream: many Classify calls over one bidirectional stream, answered as they finish.

A front end that multiplexes many callers onto a few connections (snaplearn-gateway) pays
grpc's per-call work once per stream message instead of once per photo, and packs whatever is
waiting into each message. Every item is one Classify: the same core call (validation,
batching, deadline, event, metrics), its outcome a per-item status, never the stream's.

With tokens on, a stream is one caller's (the gateway opens one per caller token): the
security interceptor admits it once, and each item is then checked as a Classify call would
be, by the interceptor's ItemChecks: the token's expiry (a JWT that expires while its stream
is open stops working), the tenant rule, and the caller's rate limit, one token per item.
A refused item gets its status; the stream and the caller's other items go on.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import AsyncIterator

import grpc
from grpc import aio

from snaplearn.vision.v1 import vision_pb2
from snaplearn_common.security import interceptor as security
from snaplearn_vision.core.service import ClassificationService
from snaplearn_vision.edges.call import Failed, cancelled_status, observed
from snaplearn_vision.edges.classify import classify_request, classify_response

log = logging.getLogger(__name__)

# The ClassifyStream header naming the server process that serves the stream (VisionServicer).
INSTANCE_HEADER = "snaplearn-server-instance"
# What an item cancelled before its answer reads, by the reason it was cancelled.
_CANCELLED_MESSAGES = {
    grpc.StatusCode.DEADLINE_EXCEEDED: "the item's deadline passed",
    grpc.StatusCode.CANCELLED: "the item was cancelled by the client",
}


class ClassifyStreamSession:
    """One ClassifyStream call: its items in flight and the answers not yet written."""

    def __init__(self, service: ClassificationService) -> None:
        self._service = service
        self._loop = asyncio.get_running_loop()
        self._items: dict[
            int, tuple[asyncio.Task[vision_pb2.ClassifyStreamResult], asyncio.TimerHandle | None]
        ] = {}
        self._started: set[int] = set()  # items whose task has begun (observed() counts those)
        self._answers: list[vision_pb2.ClassifyStreamResult] = []
        self._wake = asyncio.Event()
        self._reading = True
        self._draining = False
        self._checks = _item_checks()  # None: authentication and the rate limit are off

    async def serve(
        self, requests: AsyncIterator[vision_pb2.ClassifyStreamRequest], context: aio.ServicerContext
    ) -> None:
        """Reads items and writes answers until the client has closed its side and all are answered."""
        reader = asyncio.ensure_future(self._read(requests))
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                if self._answers:
                    # What finished while the last write was in progress goes out as one message.
                    answers, self._answers = self._answers, []
                    await context.write(vision_pb2.ClassifyStreamResponse(results=answers))
                if (self._draining or not self._reading) and not self._items and not self._answers:
                    break
            if not self._draining:
                reader.result()  # a failed read (a malformed message) ends the stream with its error
        finally:
            reader.cancel()
            for task, timer in self._items.values():
                task.cancel()
                if timer is not None:
                    timer.cancel()

    def drain(self) -> None:
        """The server is stopping: answer the items started, start no more, end the stream OK.

        Items that arrive from now on are neither started nor answered: the client learns from
        the stream ending OK that they were never processed, and sends them again elsewhere.
        """
        self._draining = True
        self._wake.set()

    async def _read(self, requests: AsyncIterator[vision_pb2.ClassifyStreamRequest]) -> None:
        try:
            async for message in requests:
                if self._draining:
                    continue
                for item in message.items:
                    self._start(item)
                for item_id in message.cancel_ids:
                    entry = self._items.get(item_id)
                    if entry is not None:
                        entry[0].cancel()
        finally:
            self._reading = False
            self._wake.set()

    def _answer(self, result: vision_pb2.ClassifyStreamResult) -> None:
        self._answers.append(result)
        self._wake.set()

    def _start(self, item: vision_pb2.ClassifyStreamItem) -> None:
        if item.id in self._items:
            self._answer(_error(item.id, INVALID, f"item id {item.id} is already in flight on this stream"))
            return
        timeout_ms = item.timeout_ms
        if not (timeout_ms >= 0.0 and math.isfinite(timeout_ms)):
            self._answer(_error(item.id, INVALID, f"timeout_ms must be >= 0 and finite, got {timeout_ms}"))
            return
        if self._checks is not None:
            refusal = self._checks.refusal(item.request.user_id)
            if refusal is not None:
                self._answer(_error(item.id, *refusal))
                return
        deadline = time.monotonic() + timeout_ms / 1000.0 if timeout_ms > 0.0 else None
        task = self._loop.create_task(self._classify(item.id, item.request, deadline))
        # Like grpc does for a call: the item's work is cancelled when its deadline passes
        # (the loop's clock is time.monotonic()).
        timer = self._loop.call_at(deadline, task.cancel) if deadline is not None else None
        self._items[item.id] = (task, timer)
        # The answer is written by the task's done callback, not by the task itself: a task
        # cancelled before its first step (its id in the cancel_ids of the message that sent it)
        # never runs its body, and would otherwise never be answered.
        task.add_done_callback(functools.partial(self._finished, item.id, deadline))

    async def _classify(
        self, item_id: int, request: vision_pb2.ClassifyRequest, deadline: float | None
    ) -> vision_pb2.ClassifyStreamResult:
        self._started.add(item_id)
        outcome = await observed(
            self._service.metrics,
            classify_request(self._service, request, deadline),
            started=time.monotonic(),
            deadline=deadline,
            method="ClassifyStream",
        )
        if isinstance(outcome, Failed):
            return _error(item_id, outcome.status, outcome.message)
        return vision_pb2.ClassifyStreamResult(id=item_id, response=classify_response(outcome))

    def _finished(
        self, item_id: int, deadline: float | None, task: asyncio.Task[vision_pb2.ClassifyStreamResult]
    ) -> None:
        _, timer = self._items.pop(item_id)
        if timer is not None:
            timer.cancel()
        started = item_id in self._started
        self._started.discard(item_id)
        if task.cancelled():
            # By a cancel_ids entry, by its deadline timer, or because the stream ended.
            status = cancelled_status(deadline)
            if not started:  # observed() counts the items it saw cancelled; this one it never saw
                self._service.metrics.observe_request(status.name, 0.0)
            answer = _error(item_id, status, _CANCELLED_MESSAGES[status])
        elif (error := task.exception()) is not None:
            log.error("unexpected error answering ClassifyStream item %d", item_id, exc_info=error)
            answer = _error(
                item_id, grpc.StatusCode.INTERNAL, "internal error in ClassifyStream; see server logs"
            )
        else:
            answer = task.result()
        self._answer(answer)


INVALID = grpc.StatusCode.INVALID_ARGUMENT


def _item_checks() -> security.ItemChecks | None:
    """The per-item checks the security interceptor set for this stream's call, if any."""
    return security.ITEM_CHECKS.get()


def _error(item_id: int, status: grpc.StatusCode, message: str) -> vision_pb2.ClassifyStreamResult:
    return vision_pb2.ClassifyStreamResult(id=item_id, code=status.value[0], message=message)
