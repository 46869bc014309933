"""Dynamic batching: many concurrent callers, one blocking batch function.

Each `submit` parks an asyncio future in a bounded FIFO queue; a single loop task takes
batches off the head of the queue and runs the *blocking* batch function in a dedicated
executor, never on the event loop (the same shape as Ray Serve's serve/batching.py and
LitServe's collate step).

A batch is dispatched when `max_batch_size` requests wait, or when the oldest one has
waited `max_queue_delay_s`, whichever comes first, and only when an executor thread is
free. When the batch is due but requests admitted upstream are still being prepared
(`incoming`, e.g. decoding), it waits for them for `incoming_grace_s()` (about the time one
takes to prepare), at most one more `max_queue_delay_s`.
The next batch keeps forming in the queue while the current one computes, so it leaves
the moment the executor frees up (pipelining) while at most one batch computes per
executor thread.

Admission is decided at once, so overload is answered right away rather than after a
wait: a full queue refuses (Overloaded), and so does a queue whose estimated drain time
(what is left of the batch computing now, then the batches ahead and its own, each a moving
average of batch compute time) would finish the request after its deadline: it would only have
taken a slot and then expired. Right before compute, requests
whose deadline has passed fail with DeadlineExpired and requests whose caller went away
(future cancelled, as gRPC does when a call is cancelled) are skipped, so the batch function
never sees them.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from snaplearn_common import errors
from snaplearn_vision.schema import BatchingLimits

log = logging.getLogger(__name__)

ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")

Clock = Callable[[], float]

# Rejection reasons reported to BatcherMetrics.count_rejection (label values).
REJECT_QUEUE_FULL = "queue_full"
REJECT_DEADLINE_UNMEETABLE = "deadline_unmeetable"  # the queue ahead would outlast the deadline
REJECT_DEADLINE = "deadline_expired"
REJECT_CANCELLED = "cancelled"
REJECT_SHUTTING_DOWN = "shutting_down"


class BatcherMetrics(Protocol):
    """What the batcher reports; VisionMetrics.for_model() returns one of these."""

    def set_queue_depth(self, depth: int) -> None: ...

    def observe_queue_wait(self, seconds: float) -> None: ...

    def observe_batch(self, size: int, compute_s: float) -> None: ...

    def set_computing(self, requests: int) -> None: ...

    def count_rejection(self, reason: str) -> None: ...


class BatchOutputMismatch(RuntimeError):
    """The batch function returned a number of results different from the number of inputs.

    Deliberately not a SnapLearnError: it is a server bug, so clients see INTERNAL.
    """


@dataclass(frozen=True, slots=True)
class BatchedResult(Generic[ResultT]):
    """One request's result plus how it was served."""

    value: ResultT
    queue_wait_s: float  # from submit to the start of its batch's compute
    compute_s: float  # wall time of the batch function for its whole batch
    batch_size: int  # requests actually computed in that batch


@dataclass(eq=False, slots=True)  # eq=False: identity comparison, so deque.remove finds *this* request
class _Request(Generic[ItemT, ResultT]):
    item: ItemT
    future: asyncio.Future[BatchedResult[ResultT]]
    enqueued_at: float
    waiting_since: float  # its max_queue_delay_s counts from here (its arrival, by default enqueued_at)
    deadline: float | None


@dataclass(slots=True)
class _NullMetrics:
    def set_queue_depth(self, depth: int) -> None:
        pass

    def observe_queue_wait(self, seconds: float) -> None:
        pass

    def observe_batch(self, size: int, compute_s: float) -> None:
        pass

    def set_computing(self, requests: int) -> None:
        pass

    def count_rejection(self, reason: str) -> None:
        pass


@dataclass(slots=True)
class BatcherStats:
    """Counters for tests and debugging (the metrics object is the operational view)."""

    batches: int = 0
    computed: int = 0
    expired: int = 0
    cancelled: int = 0
    rejected: int = 0
    # The latest batch sizes only: a server computes millions of batches.
    batch_sizes: collections.deque[int] = field(default_factory=lambda: collections.deque(maxlen=1024))
    total_queue_wait_s: float = 0.0  # summed over computed requests
    total_latency_s: float = 0.0  # queue wait + compute, summed over computed requests


class DynamicBatcher(Generic[ItemT, ResultT]):
    """Collects concurrent `submit` calls into batches for a blocking `process(items) -> results`.

    Lifecycle: `start()` (from a running event loop), any number of `submit`s, then
    `stop(drain=True)` which rejects new work, computes everything already queued and
    shuts the executor down. `stop(drain=False)` fails queued requests with Unavailable
    instead (the batch already computing still finishes: a thread cannot be interrupted).
    """

    def __init__(
        self,
        process: Callable[[list[ItemT]], Sequence[ResultT]],
        limits: BatchingLimits,
        *,
        name: str = "batcher",
        metrics: BatcherMetrics | None = None,
        compute_threads: int = 1,
        clock: Clock = time.monotonic,
        thread_initializer: Callable[[], None] | None = None,
        incoming: Callable[[], int] | None = None,
        incoming_grace_s: Callable[[], float] | None = None,
    ) -> None:
        if compute_threads < 1:
            raise ValueError(f"compute_threads must be >= 1, got {compute_threads}")
        self._process = process
        self.limits = limits
        self.name = name
        self._metrics: BatcherMetrics = metrics if metrics is not None else _NullMetrics()
        self._compute_threads = compute_threads
        self._clock = clock
        self._thread_initializer = thread_initializer
        # Requests admitted upstream and still being prepared (decoded): they join shortly.
        self._incoming = incoming
        # How long a due batch waits for them: long enough for one to finish preparing, not a
        # whole extra delay, which every request in such a batch would pay at light load.
        self._incoming_grace_s = incoming_grace_s
        self._awaiting_incoming = False  # the loop waits for them: every submit must wake it
        self._batch_seconds = 0.0  # moving average of batch compute time; 0 until one ran
        self._compute_started: list[float] = []  # when each batch computing now began (clock)
        self._pending: collections.deque[_Request[ItemT, ResultT]] = collections.deque()
        self._executor: ThreadPoolExecutor | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._compute_tasks: set[asyncio.Task[None]] = set()
        # Created in start(): asyncio primitives belong to the loop that runs the batcher.
        self._wakeup: asyncio.Event | None = None
        self._free_threads: asyncio.Semaphore | None = None
        self._accepting = False
        self._stopping = False
        self.stats = BatcherStats()
        self._computing = 0  # requests in batches being computed

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._accepting

    @property
    def waiting_for_incoming(self) -> bool:
        """A due batch is held back for requests still being prepared upstream."""
        return self._awaiting_incoming

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a batch (not those computing)."""
        return len(self._pending)

    def start(self) -> None:
        if self._loop_task is not None:
            raise RuntimeError(f"{self.name} already started")
        self._executor = ThreadPoolExecutor(
            max_workers=self._compute_threads,
            thread_name_prefix=f"{self.name}-compute",
            initializer=self._thread_initializer,
        )
        self._wakeup = asyncio.Event()
        self._free_threads = asyncio.Semaphore(self._compute_threads)
        self._accepting = True
        self._loop_task = asyncio.get_running_loop().create_task(
            self._batching_loop(), name=f"{self.name}-loop"
        )

    async def stop(self, drain: bool = True) -> None:
        """Stop accepting; compute (drain=True) or fail (drain=False) what is queued; join the executor."""
        if self._loop_task is None:
            return
        self._accepting = False
        if not drain:
            while self._pending:
                request = self._pending.popleft()
                self._fail(request, errors.Unavailable(f"{self.name} is shutting down"), REJECT_SHUTTING_DOWN)
            self._metrics.set_queue_depth(0)
        self._stopping = True
        self._wake()
        try:
            await self._loop_task
        except Exception:
            pass  # the loop logged its crash and failed what was queued; finish stopping
        finally:
            if self._compute_tasks:
                await asyncio.gather(*self._compute_tasks, return_exceptions=True)
            if self._executor is not None:
                # No batch is running any more; wait=False so that even a cancelled stop()
                # can never block the event loop on a thread.
                self._executor.shutdown(wait=False)
                self._executor = None

    # -- submitting ------------------------------------------------------------------------

    def check_capacity(self, deadline: float | None = None, incoming: int = 0) -> None:
        """Raise Overloaded (and count it) when the queue is full or would outlast `deadline`.

        `submit` checks this itself; callers may check first to skip costly preparation
        (decoding an image) for a request the queue would refuse anyway, counting as
        `incoming` the requests they admitted that are still preparing.
        """
        depth = len(self._pending) + incoming
        if depth >= self.limits.max_queue_size:
            self._count(REJECT_QUEUE_FULL)
            raise errors.Overloaded(
                f"server overloaded: {self.name} queue is full "
                f"({self.limits.max_queue_size} requests waiting); retry with backoff"
            )
        # Only when work stands ahead: an idle batcher always admits, so one slow batch (a
        # first compilation, a stall) cannot leave an estimate that refuses everything forever.
        if deadline is not None and self._batch_seconds > 0.0 and (depth or self._computing):
            now = self._clock()
            # Its own batch, the full batches ahead of it, and what is left of the one computing
            # now: counted whole, a batch nearly done would refuse calls that meet their deadline.
            batches = depth // self.limits.max_batch_size + 1
            left_s = 0.0
            if self._compute_started:
                left_s = max(0.0, self._batch_seconds - (now - min(self._compute_started)))
            expected_s = batches * self._batch_seconds + left_s
            if now + expected_s > deadline:
                self._count(REJECT_DEADLINE_UNMEETABLE)
                raise errors.Overloaded(
                    f"server overloaded: {depth} requests wait in {self.name}'s queue, about "
                    f"{expected_s:.3f}s of work, longer than the request's deadline allows; "
                    "retry with backoff or a longer deadline"
                )

    async def submit(
        self, item: ItemT, deadline: float | None = None, arrived_at: float | None = None
    ) -> BatchedResult[ResultT]:
        """Queue `item` and wait for its result.

        deadline: absolute time on this batcher's clock (time.monotonic() by default);
        None waits as long as it takes. arrived_at: when the request reached the server, on
        the same clock, if it was prepared (decoded) before this call: its `max_queue_delay_s`
        then counts from its arrival, so preparation time is not added to the batching delay.
        Queue-wait metrics still count from this call. Raises Overloaded at once when the queue is full,
        DeadlineExpired when the deadline passes before compute, Unavailable when stopped,
        or whatever the batch function raised for this item's batch.
        """
        if not self._accepting:
            self._metrics.count_rejection(REJECT_SHUTTING_DOWN)
            raise errors.Unavailable(f"{self.name} is not accepting requests (stopped or not started)")
        now = self._clock()
        if deadline is not None and deadline <= now:
            self._count(REJECT_DEADLINE, stat="expired")
            raise errors.DeadlineExpired(f"the request's deadline passed before it was queued in {self.name}")
        self.check_capacity(deadline)
        future: asyncio.Future[BatchedResult[ResultT]] = asyncio.get_running_loop().create_future()
        waiting_since = now if arrived_at is None else min(arrived_at, now)
        request = _Request(
            item=item, future=future, enqueued_at=now, waiting_since=waiting_since, deadline=deadline
        )
        self._pending.append(request)
        self._metrics.set_queue_depth(len(self._pending))
        # The loop only needs waking when its decision may change: the queue stopped being
        # empty (a delay timer starts), a full batch is ready, or it waits for incoming ones.
        if (
            len(self._pending) == 1
            or len(self._pending) >= self.limits.max_batch_size
            or self._awaiting_incoming
        ):
            self._wake()
        try:
            return await future
        except asyncio.CancelledError:
            # The caller went away: free its queue slot now rather than at dispatch.
            with contextlib.suppress(ValueError):  # ValueError: already taken into a batch
                self._pending.remove(request)
                self._metrics.set_queue_depth(len(self._pending))
                self._count(REJECT_CANCELLED, stat="cancelled")
            raise

    # -- the batching loop -----------------------------------------------------------------

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()

    async def _batching_loop(self) -> None:
        try:
            await self._dispatch_batches()
        except Exception:
            # A bug here must not leave callers waiting forever.
            log.exception("%s: batching loop crashed; failing queued requests", self.name)
            self._accepting = False
            while self._pending:
                request = self._pending.popleft()
                self._settle_exception(request, errors.Unavailable(f"{self.name} failed; see server logs"))
            raise

    async def _dispatch_batches(self) -> None:
        assert self._free_threads is not None
        loop = asyncio.get_running_loop()
        while True:
            # Hold a thread before choosing a batch: the batch is taken as late as possible,
            # so it has the most requests and deadlines are checked right before compute.
            await self._free_threads.acquire()
            try:
                batch = await self._next_batch()
            except BaseException:
                self._free_threads.release()
                raise
            if batch is None:
                self._free_threads.release()
                return
            task = loop.create_task(self._compute(batch), name=f"{self.name}-batch")
            self._compute_tasks.add(task)
            task.add_done_callback(self._compute_tasks.discard)

    async def _next_batch(self) -> list[_Request[ItemT, ResultT]] | None:
        """Wait until a batch is due and take it; None once stopping with nothing left."""
        assert self._wakeup is not None
        limits = self.limits
        grace_until: float | None = None  # set once this batch waits for decoding requests
        while True:
            if not self._pending:
                if self._stopping:
                    return None
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if len(self._pending) < limits.max_batch_size and not self._stopping:
                remaining = self._pending[0].waiting_since + limits.max_queue_delay_s - self._clock()
                if remaining <= 0 and self._incoming is not None and self._incoming() > 0:
                    # Requests still decoding would join this batch within about a decode: the
                    # model is free only now, so wait for them, for the grace (at most one more
                    # queue delay, counted from the first time this batch found them). Without this a
                    # closed loop of callers splits into cohorts whose batches never fill.
                    if grace_until is None:
                        grace_until = self._clock() + self._grace_s()
                    remaining = grace_until - self._clock()
                if remaining > 0:
                    self._wakeup.clear()
                    # A timer that sets the event: no task per wait, unlike asyncio.wait_for.
                    timer = asyncio.get_running_loop().call_later(remaining, self._wakeup.set)
                    self._awaiting_incoming = grace_until is not None
                    try:
                        await self._wakeup.wait()
                    finally:
                        timer.cancel()
                        self._awaiting_incoming = False
                    continue  # re-evaluate: woken early, timer fired, or the head was cancelled
            batch = self._take_batch()
            if batch:
                return batch
            # Everything at the head had expired or was cancelled: look again.

    def _grace_s(self) -> float:
        delay = self.limits.max_queue_delay_s
        if self._incoming_grace_s is None:
            return delay
        return min(delay, max(0.0, self._incoming_grace_s()))

    def _take_batch(self) -> list[_Request[ItemT, ResultT]]:
        now = self._clock()
        batch: list[_Request[ItemT, ResultT]] = []
        while self._pending and len(batch) < self.limits.max_batch_size:
            request = self._pending.popleft()
            if request.future.done():  # cancelled by its caller
                self._count(REJECT_CANCELLED, stat="cancelled")
                continue
            if request.deadline is not None and request.deadline <= now:
                self._fail(
                    request,
                    errors.DeadlineExpired(
                        f"the request's deadline passed after {now - request.enqueued_at:.3f}s "
                        f"waiting in {self.name}'s queue, before compute"
                    ),
                    REJECT_DEADLINE,
                    stat="expired",
                )
                continue
            batch.append(request)
        self._metrics.set_queue_depth(len(self._pending))
        return batch

    async def _compute(self, batch: list[_Request[ItemT, ResultT]]) -> None:
        assert self._free_threads is not None
        try:
            await self._compute_batch(batch)
        except Exception as exc:  # a bug in the bookkeeping, not in the batch function
            log.exception("%s: unexpected error while computing a batch", self.name)
            for request in batch:
                self._settle_exception(request, exc)
        finally:
            self._computing -= len(batch)
            self._metrics.set_computing(self._computing)
            self._free_threads.release()

    async def _compute_batch(self, batch: list[_Request[ItemT, ResultT]]) -> None:
        assert self._executor is not None
        started = self._clock()
        for request in batch:
            self._metrics.observe_queue_wait(started - request.enqueued_at)
        items = [request.item for request in batch]
        loop = asyncio.get_running_loop()
        self._computing += len(batch)
        self._metrics.set_computing(self._computing)
        self._compute_started.append(started)
        try:
            outputs, compute_s = await loop.run_in_executor(self._executor, self._timed_process, items)
        except Exception as exc:
            # Every request of the batch gets the same error: none of them has a result.
            log.warning("%s: batch of %d failed: %r", self.name, len(batch), exc)
            for request in batch:
                self._settle_exception(request, exc)
            return
        finally:
            self._compute_started.remove(started)
        stats = self.stats
        stats.batches += 1
        stats.computed += len(batch)
        stats.batch_sizes.append(len(batch))
        # A short memory: the estimate must follow load (batch sizes) within a few batches.
        self._batch_seconds = (
            compute_s if self._batch_seconds == 0.0 else 0.7 * self._batch_seconds + 0.3 * compute_s
        )
        waited = sum(started - request.enqueued_at for request in batch)
        stats.total_queue_wait_s += waited
        stats.total_latency_s += waited + compute_s * len(batch)
        self._metrics.observe_batch(len(batch), compute_s)
        try:
            output_count = len(outputs)
        except TypeError:
            output_count = -1
        if output_count != len(batch):
            mismatch = BatchOutputMismatch(
                f"{self.name}: batch function returned {output_count if output_count >= 0 else 'no sized'} "
                f"results for {len(batch)} inputs"
            )
            log.error("%s", mismatch)
            for request in batch:
                self._settle_exception(request, mismatch)
            return
        for request, output in zip(batch, outputs, strict=True):
            if not request.future.done():  # its caller may have gone away meanwhile
                request.future.set_result(
                    BatchedResult(
                        value=output,
                        queue_wait_s=started - request.enqueued_at,
                        compute_s=compute_s,
                        batch_size=len(batch),
                    )
                )

    def _timed_process(self, items: list[ItemT]) -> tuple[Sequence[ResultT], float]:
        """Runs on the executor thread."""
        started = time.perf_counter()
        outputs = self._process(items)
        return outputs, time.perf_counter() - started

    # -- helpers ---------------------------------------------------------------------------

    def _count(self, reason: str, stat: str = "rejected") -> None:
        setattr(self.stats, stat, getattr(self.stats, stat) + 1)
        self._metrics.count_rejection(reason)

    def _fail(
        self, request: _Request[ItemT, ResultT], exc: BaseException, reason: str, stat: str = "rejected"
    ) -> None:
        self._count(reason, stat)
        self._settle_exception(request, exc)

    @staticmethod
    def _settle_exception(request: _Request[ItemT, ResultT], exc: BaseException) -> None:
        if not request.future.done():
            request.future.set_exception(exc)
