"""DynamicBatcher: dispatch rules, admission control, failure handling, lifecycle.

Timing is driven by gates (threading.Event inside the batch function) and an injected
clock, never by sleeps: a test either waits for a condition or cannot pass at all.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from snaplearn_common import errors
from snaplearn_vision.core.batcher import (
    REJECT_CANCELLED,
    REJECT_DEADLINE,
    REJECT_DEADLINE_UNMEETABLE,
    REJECT_QUEUE_FULL,
    BatchedResult,
    BatchOutputMismatch,
    DynamicBatcher,
)
from snaplearn_vision.schema import BatchingLimits

pytestmark = pytest.mark.timeout(30)

HOUR_S = 3600.0  # a queue delay no test waits for: dispatch must come from a full batch or a stop


class ManualClock:
    """A monotonic clock that only moves when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class RecordingMetrics:
    depths: list[int] = field(default_factory=list)
    waits: list[float] = field(default_factory=list)
    batches: list[tuple[int, float]] = field(default_factory=list)
    rejections: list[str] = field(default_factory=list)
    computing: list[int] = field(default_factory=list)

    def set_queue_depth(self, depth: int) -> None:
        self.depths.append(depth)

    def observe_queue_wait(self, seconds: float) -> None:
        self.waits.append(seconds)

    def observe_batch(self, size: int, compute_s: float) -> None:
        self.batches.append((size, compute_s))

    def set_computing(self, requests: int) -> None:
        self.computing.append(requests)

    def count_rejection(self, reason: str) -> None:
        self.rejections.append(reason)


class GatedDoubler:
    """Batch function: doubles each item; optionally blocks on a gate; records what it saw."""

    def __init__(self, gated: bool = False) -> None:
        self.seen: list[list[int]] = []
        self.threads: set[int] = set()
        self.gate = threading.Event()
        if not gated:
            self.gate.set()
        self.entered = threading.Event()
        self._lock = threading.Lock()
        self.concurrent = 0
        self.max_concurrent = 0

    def __call__(self, items: list[int]) -> list[int]:
        with self._lock:
            self.seen.append(list(items))
            self.threads.add(threading.get_ident())
            self.concurrent += 1
            self.max_concurrent = max(self.max_concurrent, self.concurrent)
        self.entered.set()
        try:
            if not self.gate.wait(timeout=20):
                raise TimeoutError("test gate never opened")
            return [item * 2 for item in items]
        finally:
            with self._lock:
                self.concurrent -= 1

    async def wait_entered(self) -> None:
        """Wait (off the loop) until a batch is inside the function, then re-arm."""
        assert await asyncio.to_thread(self.entered.wait, 20), "batch function was never called"
        self.entered.clear()


async def until(condition: Callable[[], bool], what: str) -> None:
    """Let other tasks run until condition holds (bounded, so a bug fails instead of hanging)."""
    for _ in range(10_000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"never happened: {what}")


def make_batcher(
    process: Callable[[list[int]], Sequence[Any]],
    max_batch_size: int = 4,
    max_queue_delay_s: float = HOUR_S,
    max_queue_size: int = 64,
    **kwargs: Any,
) -> DynamicBatcher[int, Any]:
    batcher: DynamicBatcher[int, Any] = DynamicBatcher(
        process,
        BatchingLimits(max_batch_size, max_queue_delay_s, max_queue_size),
        name="test-batcher",
        **kwargs,
    )
    batcher.start()
    return batcher


def spawn(awaitable: Awaitable[BatchedResult[Any]]) -> asyncio.Task[BatchedResult[Any]]:
    async def run() -> BatchedResult[Any]:
        return await awaitable

    return asyncio.create_task(run())


async def test_full_batch_dispatched_without_waiting_for_the_delay() -> None:
    process = GatedDoubler()
    batcher = make_batcher(process, max_batch_size=4, max_queue_delay_s=HOUR_S)
    try:
        results = await asyncio.gather(*(batcher.submit(i) for i in range(4)))
    finally:
        await batcher.stop()
    assert [r.value for r in results] == [0, 2, 4, 6]
    assert process.seen == [[0, 1, 2, 3]]
    assert {r.batch_size for r in results} == {4}
    assert all(r.queue_wait_s >= 0 and r.compute_s >= 0 for r in results)


async def test_lone_request_dispatched_after_max_delay() -> None:
    process = GatedDoubler()
    delay_s = 0.05
    batcher = make_batcher(process, max_batch_size=8, max_queue_delay_s=delay_s)
    try:
        result = await batcher.submit(21)
    finally:
        await batcher.stop()
    assert result.value == 42
    assert result.batch_size == 1
    assert process.seen == [[21]]
    # Dispatch is decided on the batcher's clock, so the wait can never be shorter than the delay.
    assert result.queue_wait_s >= delay_s


async def test_a_due_batch_waits_for_requests_still_being_prepared() -> None:
    # The model frees up while one request waits past its delay and another is still decoding
    # upstream: the batch waits for it rather than leaving half-empty. The clock is frozen,
    # so only the arrival can release the batch.
    process = GatedDoubler(gated=True)
    clock = ManualClock()
    preparing = [0]
    batcher = make_batcher(
        process, max_batch_size=2, max_queue_delay_s=1.0, clock=clock, incoming=lambda: preparing[0]
    )
    try:
        first = [spawn(batcher.submit(i)) for i in (0, 1)]
        await process.wait_entered()
        head = spawn(batcher.submit(10))
        preparing[0] = 1
        await until(lambda: batcher.queue_depth == 1, "the head queued")
        clock.advance(2.0)  # its delay is long past when the model frees up
        process.gate.set()
        await asyncio.gather(*first)
        await until(lambda: batcher.waiting_for_incoming, "the batcher holds the batch back")
        assert process.seen == [[0, 1]]
        preparing[0] = 0
        late = spawn(batcher.submit(11))
        results = await asyncio.gather(head, late)
    finally:
        await batcher.stop()
    assert process.seen == [[0, 1], [10, 11]]
    assert [r.batch_size for r in results] == [2, 2]


async def test_the_wait_for_requests_being_prepared_lasts_at_most_one_more_delay() -> None:
    process = GatedDoubler()
    clock = ManualClock()
    batcher = make_batcher(process, max_batch_size=4, max_queue_delay_s=0.01, clock=clock, incoming=lambda: 3)
    try:
        head = spawn(batcher.submit(5))
        await until(lambda: batcher.queue_depth == 1, "the head queued")
        clock.advance(0.02)  # the head's delay is over: the grace starts now
        await until(lambda: batcher.waiting_for_incoming, "the batcher holds the batch back")
        clock.advance(0.02)  # and now the grace is over too; the next timer tick sends it alone
        result = await head
    finally:
        await batcher.stop()
    assert result.batch_size == 1
    assert process.seen == [[5]]


async def test_the_wait_for_requests_being_prepared_lasts_the_grace_it_is_given() -> None:
    # With a grace of about one decode, a due batch waits that long, not a whole extra delay.
    process = GatedDoubler()
    clock = ManualClock()
    batcher = make_batcher(
        process,
        max_batch_size=4,
        max_queue_delay_s=0.01,
        clock=clock,
        incoming=lambda: 3,
        incoming_grace_s=lambda: 0.002,
    )
    try:
        head = spawn(batcher.submit(5))
        await until(lambda: batcher.queue_depth == 1, "the head queued")
        clock.advance(0.02)  # the head's delay is over: the grace starts now
        await until(lambda: batcher.waiting_for_incoming, "the batcher holds the batch back")
        clock.advance(0.003)  # past the 2 ms grace, well inside one more delay (10 ms)
        result = await head
    finally:
        await batcher.stop()
    assert result.batch_size == 1
    assert process.seen == [[5]]


async def test_the_delay_counts_from_arrival_when_the_request_was_prepared_first() -> None:
    # Decoded for 0.9 s before it was submitted: 0.2 s later its 1 s delay is over.
    process = GatedDoubler()
    clock = ManualClock()
    batcher = make_batcher(process, max_batch_size=4, max_queue_delay_s=1.0, clock=clock)
    try:
        request = spawn(batcher.submit(7, arrived_at=clock() - 0.9))
        await until(lambda: batcher.queue_depth == 1, "queued")
        clock.advance(0.2)
        result = await request
    finally:
        await batcher.stop()
    assert process.seen == [[7]]
    assert result.queue_wait_s == pytest.approx(0.2)  # queue wait still counts from submit


async def test_expired_deadlines_are_dropped_before_compute() -> None:
    clock = ManualClock()
    metrics = RecordingMetrics()
    process = GatedDoubler(gated=True)
    batcher = make_batcher(process, max_batch_size=8, max_queue_delay_s=0, clock=clock, metrics=metrics)
    try:
        first = spawn(batcher.submit(1))
        await process.wait_entered()  # [1] is computing and holds the only compute thread
        expiring = spawn(batcher.submit(2, deadline=clock() + 1.0))
        patient = spawn(batcher.submit(3, deadline=clock() + 60.0))
        await until(lambda: batcher.queue_depth == 2, "two requests queued")
        clock.advance(5.0)  # 2's deadline passes while it waits
        process.gate.set()
        assert (await first).value == 2
        assert (await patient).value == 6
        with pytest.raises(errors.DeadlineExpired, match="deadline passed"):
            await expiring
        # Already expired at submit: rejected at once, never queued.
        with pytest.raises(errors.DeadlineExpired):
            await batcher.submit(4, deadline=clock() - 0.001)
    finally:
        await batcher.stop()
    assert process.seen == [[1], [3]]  # the batch function never saw 2 or 4
    assert metrics.rejections.count(REJECT_DEADLINE) == 2
    assert batcher.stats.expired == 2


async def test_full_queue_rejects_immediately_with_overloaded() -> None:
    metrics = RecordingMetrics()
    process = GatedDoubler(gated=True)
    batcher = make_batcher(process, max_batch_size=1, max_queue_delay_s=0, max_queue_size=2, metrics=metrics)
    try:
        computing = spawn(batcher.submit(1))
        await process.wait_entered()
        queued = [spawn(batcher.submit(2)), spawn(batcher.submit(3))]
        await until(lambda: batcher.queue_depth == 2, "queue full")
        with pytest.raises(errors.Overloaded, match=r"queue is full \(2 requests waiting\)"):
            await batcher.submit(4)  # returns without waiting for the gate
        process.gate.set()
        assert [(await t).value for t in (computing, *queued)] == [2, 4, 6]
    finally:
        await batcher.stop()
    assert process.seen == [[1], [2], [3]]
    assert metrics.rejections == [REJECT_QUEUE_FULL]
    assert max(metrics.depths) == 2


async def test_a_deadline_the_queue_would_outlast_is_refused_at_once() -> None:
    clock = ManualClock()
    metrics = RecordingMetrics()
    process = GatedDoubler()
    batcher = make_batcher(process, max_batch_size=2, max_queue_delay_s=0, clock=clock, metrics=metrics)
    try:
        # No batch has run: nothing is known about compute time, so nothing is refused for it.
        assert (await batcher.submit(1, deadline=clock() + 1e-9)).value == 2
        process.gate.clear()
        computing = spawn(batcher.submit(2))
        await process.wait_entered()
        queued = [spawn(batcher.submit(n, deadline=clock() + HOUR_S)) for n in (3, 4, 5)]
        await until(lambda: batcher.queue_depth == 3, "three queued")
        # Three batches (two queued, one computing) stand before it: however fast a batch is
        # (the one measured took > 0 s), a deadline a nanosecond away cannot be met.
        with pytest.raises(errors.Overloaded, match="longer than the request's deadline allows"):
            await batcher.submit(6, deadline=clock() + 1e-9)
        process.gate.set()
        assert [(await t).value for t in (computing, *queued)] == [4, 6, 8, 10]
        # Idle again: admitted whatever the estimate (which the held batch made long), so a
        # slow batch can never leave a batcher that refuses everything.
        assert (await batcher.submit(7, deadline=clock() + 1e-9)).value == 14
    finally:
        await batcher.stop()
    assert all(6 not in batch for batch in process.seen)
    assert metrics.rejections == [REJECT_DEADLINE_UNMEETABLE]


async def test_the_batch_computing_counts_only_for_the_time_it_has_left() -> None:
    clock = ManualClock()
    metrics = RecordingMetrics()
    process = GatedDoubler()
    batcher = make_batcher(process, max_batch_size=2, max_queue_delay_s=0, clock=clock, metrics=metrics)
    try:
        assert (await batcher.submit(1)).value == 2
        batch_s = metrics.batches[0][1]  # the estimate's batch time: the one batch measured so far
        process.gate.clear()
        process.entered.clear()  # set by the first batch: wait for the second one's start
        computing = spawn(batcher.submit(2))
        await process.wait_entered()
        clock.advance(0.9 * batch_s)  # the batch computing is nine tenths done
        # What is left of it and then its own batch: 1.1 batch times, inside the 1.5 it has. Counting
        # the computing batch whole (2 batch times) refused it, although it meets its deadline.
        deadline = clock() + 1.5 * batch_s
        admitted = spawn(batcher.submit(3, deadline=deadline))
        await until(lambda: batcher.queue_depth == 1, "admitted")
        # Less time than that rest and a batch of its own: still refused at once.
        with pytest.raises(errors.Overloaded, match="longer than the request's deadline allows"):
            await batcher.submit(4, deadline=clock() + 1.05 * batch_s)
        clock.advance(0.1 * batch_s)  # the computing batch ends on time
        process.gate.set()
        assert (await computing).value == 4
        assert (await admitted).value == 6
        assert clock() < deadline  # its batch began in time (the check before compute passed too)
    finally:
        process.gate.set()  # a failed assertion must not leave the batch waiting on its gate
        await batcher.stop()
    assert process.seen == [[1], [2], [3]]
    assert metrics.rejections == [REJECT_DEADLINE_UNMEETABLE]


async def test_batch_failure_is_fanned_out_to_every_request() -> None:
    calls: list[list[int]] = []

    def fails_once(items: list[int]) -> list[int]:
        calls.append(items)
        if len(calls) == 1:
            raise ValueError("model exploded")
        return items

    batcher = make_batcher(fails_once, max_batch_size=3)
    try:
        outcomes = await asyncio.gather(*(batcher.submit(i) for i in range(3)), return_exceptions=True)
        assert all(isinstance(o, ValueError) and str(o) == "model exploded" for o in outcomes)
        # The batcher survives a failed batch.
        again = await asyncio.gather(*(batcher.submit(i) for i in range(3)))
        assert [r.value for r in again] == [0, 1, 2]
    finally:
        await batcher.stop()


@pytest.mark.parametrize(
    ("returned", "expected"),
    [
        (lambda items: items[:-1], "returned 2 results for 3 inputs"),
        (lambda items: [*items, 99], "returned 4 results for 3 inputs"),
        (lambda items: None, "returned no sized results for 3 inputs"),
    ],
)
async def test_output_length_mismatch_fails_every_request(
    returned: Callable[[list[int]], Any], expected: str
) -> None:
    batcher = make_batcher(returned, max_batch_size=3)
    try:
        outcomes = await asyncio.gather(*(batcher.submit(i) for i in range(3)), return_exceptions=True)
    finally:
        await batcher.stop()
    assert len(outcomes) == 3
    for outcome in outcomes:
        assert isinstance(outcome, BatchOutputMismatch)
        assert not isinstance(outcome, errors.SnapLearnError)  # a server bug: clients see INTERNAL
        assert expected in str(outcome)


async def test_cancelled_request_is_skipped_before_compute() -> None:
    metrics = RecordingMetrics()
    process = GatedDoubler(gated=True)
    batcher = make_batcher(process, max_batch_size=8, max_queue_delay_s=0, metrics=metrics)
    try:
        first = spawn(batcher.submit(1))
        await process.wait_entered()
        abandoned = spawn(batcher.submit(2))
        kept = spawn(batcher.submit(3))
        await until(lambda: batcher.queue_depth == 2, "two requests queued")
        abandoned.cancel()
        await until(lambda: batcher.queue_depth == 1, "cancelled request left the queue")
        process.gate.set()
        assert (await first).value == 2
        assert (await kept).value == 6
        with pytest.raises(asyncio.CancelledError):
            await abandoned
    finally:
        await batcher.stop()
    assert process.seen == [[1], [3]]
    assert metrics.rejections == [REJECT_CANCELLED]


async def test_next_batch_forms_while_one_computes_but_only_one_computes() -> None:
    process = GatedDoubler(gated=True)
    batcher = make_batcher(process, max_batch_size=4, max_queue_delay_s=0)
    try:
        first = spawn(batcher.submit(0))
        await process.wait_entered()
        waiting = [spawn(batcher.submit(i)) for i in range(1, 5)]
        await until(lambda: batcher.queue_depth == 4, "next batch formed")
        assert process.seen == [[0]]  # still one batch computing
        process.gate.set()
        results = [await first, *[await t for t in waiting]]
    finally:
        await batcher.stop()
    assert process.seen == [[0], [1, 2, 3, 4]]
    assert [r.batch_size for r in results] == [1, 4, 4, 4, 4]
    assert process.max_concurrent == 1
    assert threading.get_ident() not in process.threads  # never on the event loop's thread


@pytest.mark.parametrize(
    "limits",
    [
        {"max_batch_size": 0, "max_queue_delay_s": 0.0, "max_queue_size": 1},
        {"max_batch_size": -3, "max_queue_delay_s": 0.0, "max_queue_size": 1},
        {"max_batch_size": 2.5, "max_queue_delay_s": 0.0, "max_queue_size": 1},
        {"max_batch_size": 1, "max_queue_delay_s": -0.001, "max_queue_size": 1},
        {"max_batch_size": 1, "max_queue_delay_s": float("nan"), "max_queue_size": 1},
        {"max_batch_size": 1, "max_queue_delay_s": float("inf"), "max_queue_size": 1},
        {"max_batch_size": 1, "max_queue_delay_s": 0.0, "max_queue_size": 0},
    ],
)
def test_limits_are_validated(limits: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="max_"):
        BatchingLimits(**limits)


def test_smallest_valid_limits_and_thread_count() -> None:
    BatchingLimits(max_batch_size=1, max_queue_delay_s=0.0, max_queue_size=1)
    with pytest.raises(ValueError, match="compute_threads"):
        DynamicBatcher(lambda items: items, BatchingLimits(1, 0.0, 1), compute_threads=0)


async def test_stop_drains_queued_requests_then_rejects_new_ones() -> None:
    metrics = RecordingMetrics()
    process = GatedDoubler()
    batcher = make_batcher(process, max_batch_size=8, max_queue_delay_s=HOUR_S, metrics=metrics)
    pending = [spawn(batcher.submit(i)) for i in range(3)]
    await until(lambda: batcher.queue_depth == 3, "three requests queued")
    await batcher.stop(drain=True)  # without the drain these would wait an hour
    assert [(await t).value for t in pending] == [0, 2, 4]
    assert process.seen == [[0, 1, 2]]
    assert metrics.batches[0][0] == 3
    with pytest.raises(errors.Unavailable):
        await batcher.submit(9)


async def test_stop_without_drain_fails_queued_requests() -> None:
    process = GatedDoubler(gated=True)
    batcher = make_batcher(process, max_batch_size=1, max_queue_delay_s=0)
    computing = spawn(batcher.submit(1))
    await process.wait_entered()
    queued = spawn(batcher.submit(2))
    await until(lambda: batcher.queue_depth == 1, "one request queued")
    stopping = asyncio.create_task(batcher.stop(drain=False))
    with pytest.raises(errors.Unavailable, match="shutting down"):
        await queued
    process.gate.set()  # the batch already in the thread still finishes
    await stopping
    assert (await computing).value == 2
    assert process.seen == [[1]]


async def test_metrics_hooks_see_depth_batches_and_waits() -> None:
    metrics = RecordingMetrics()
    batcher = make_batcher(GatedDoubler(), max_batch_size=2, metrics=metrics)
    try:
        await asyncio.gather(*(batcher.submit(i) for i in range(4)))
    finally:
        await batcher.stop()
    assert [size for size, _ in metrics.batches] == [2, 2]
    assert all(compute_s >= 0 for _, compute_s in metrics.batches)
    assert len(metrics.waits) == 4
    assert metrics.depths[-1] == 0
