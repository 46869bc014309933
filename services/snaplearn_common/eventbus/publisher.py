"""EventPublisher: how a gRPC server publishes events without ever blocking or failing a request.

`publish` only appends to a bounded in-memory buffer (safe from the asyncio event loop; it
never touches the disk). This buffer is the only one between a request and the bus: a
background thread, the drainer, hands it to the Producer in batches, and the producer
writes each batch synchronously (Producer.send_batch) without buffering of its own.

- healthy: buffer -> send_batch (bounded by flush_timeout_s) -> counted as published; the
  drainer lingers up to linger_s after an event arrives, so that one batch (one
  transaction or produce request) carries every event of that moment instead of one
  batch per event;
- the first batch that fails puts the publisher in *backlog* mode: its events not
  delivered, then every newer event from the buffer, are appended to the spool, the
  publisher's outbox (on disk with a DiskSpool, so they survive a restart too), and the
  drainer replays the spool head in order, backing off between attempts, until the spool
  is empty; then it is healthy again. The spool is always older than the buffer, so events
  leave in publish order and each user's events (one partition, by key) stay in order.

A failed batch follows the Producer contract (base.DeliveryFailed): records it names as
retriable are sent again (with everything after the first of them, to keep the order), the
permanently rejected ones are dropped (counted); any other error counts the whole batch
as not delivered. A record can be duplicated only when a batch was ambiguous (written, but
the acknowledgement lost, or the process died between the write and the spool's ack);
consumers dedupe by event id.

Counters: published (confirmed by the bus), retried (failed attempts), spooled (events
written to the spool), dropped (never delivered: buffer or spool full, rejected by the
bus, published after stop, or left in a memory-only spool at stop). Gauges: buffered
(accepted, not in the spool, not confirmed) and spool_pending.

Payloads carry student data: nothing here logs a key, value or header.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Self

from prometheus_client import CollectorRegistry, Counter, Gauge

from snaplearn_common.eventbus.base import DeliveryFailed, Producer, ProducerRecord
from snaplearn_common.eventbus.spool import MemorySpool, Spool, SpoolFull
from snaplearn_common.events import EncodedEvent

log = logging.getLogger(__name__)

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")


def encode_spooled(topic: str, event: EncodedEvent) -> bytes:
    """topic, key, value and headers as length-prefixed fields (the spool adds its own checksum)."""
    parts = [_U16.pack(len(topic.encode())), topic.encode()]
    parts += [_U32.pack(len(event.key)), event.key, _U32.pack(len(event.value)), event.value]
    parts.append(_U16.pack(len(event.headers)))
    for name, value in event.headers:
        parts += [_U16.pack(len(name.encode())), name.encode(), _U32.pack(len(value)), value]
    return b"".join(parts)


def decode_spooled(data: bytes) -> tuple[str, EncodedEvent]:
    offset = 0

    def take(size_struct: struct.Struct) -> bytes:
        nonlocal offset
        (size,) = size_struct.unpack_from(data, offset)
        offset += size_struct.size
        chunk = data[offset : offset + size]
        if len(chunk) != size:
            raise ValueError("truncated spool record")
        offset += size
        return chunk

    topic = take(_U16).decode()
    key, value = take(_U32), take(_U32)
    (count,) = _U16.unpack_from(data, offset)
    offset += _U16.size
    headers = tuple((take(_U16).decode(), take(_U32)) for _ in range(count))
    return topic, EncodedEvent(key=key, value=value, headers=headers)


class EventPublisher:
    """Non-blocking, bounded, spooling publisher over a Producer (which the caller owns and closes).

    Lifecycle: start() -> publish()... -> stop(timeout_s). Events published before start()
    are buffered. stop() delivers what it can within timeout_s; what is left stays in a
    DiskSpool for the next run (or is counted as dropped with a memory-only spool).
    linger_s: how long the first event of a batch waits for others before the batch is sent.
    flush_timeout_s: how long one send_batch may take before its events count as not
    delivered (they go to the spool); it also bounds how long stop() waits after timeout_s.
    spool: where unconfirmed events wait (default: a MemorySpool of max_spooled records);
    the publisher does not close it. topics: renames the topics callers publish to (the
    names in snaplearn_common.events) to the ones this deployment configured.
    """

    def __init__(
        self,
        producer: Producer,
        *,
        spool: Spool | None = None,
        topics: Mapping[str, str] | None = None,
        max_buffered: int = 10_000,
        max_spooled: int = 100_000,
        flush_timeout_s: float = 5.0,
        max_batch: int = 500,
        linger_s: float = 0.005,
        retry_initial_backoff_s: float = 0.05,
        retry_max_backoff_s: float = 2.0,
        registry: CollectorRegistry | None = None,
        metric_prefix: str = "snaplearn_eventbus_publisher",
        name: str = "event-publisher",
    ) -> None:
        if max_buffered < 1:
            raise ValueError("max_buffered must be at least 1")
        self._producer = producer
        self._spool = spool if spool is not None else MemorySpool(max_spooled)
        self._topics = dict(topics or {})
        self.max_buffered = max_buffered
        self._flush_timeout_s = flush_timeout_s
        self._max_batch = max(1, max_batch)
        if linger_s < 0:
            raise ValueError("linger_s must be >= 0")
        self._linger_s = linger_s
        self._initial_backoff_s = retry_initial_backoff_s
        self._max_backoff_s = retry_max_backoff_s
        self._name = name
        # One lock for the buffer and the counters; held only for O(1) work, so publish()
        # never waits on I/O even while the drainer is stuck in a slow backend call.
        self._lock = threading.Lock()
        self._buffer: deque[tuple[str, EncodedEvent]] = deque()
        self._oldest_buffered_at = 0.0  # when the buffer last went from empty to not empty
        self._has_work = threading.Condition(self._lock)
        self._in_flight = 0  # taken from the buffer by the drainer, not yet confirmed or spooled
        self._stopping = False
        self._abandon = threading.Event()  # stop() timed out: finish the current step and exit
        self._thread: threading.Thread | None = None
        self._stopped = False
        # Drainer-thread state.
        self._failures = 0  # consecutive failed attempts (backoff exponent)
        self._retry_at = 0.0
        self.published = 0
        self.retried = 0
        self.spooled = 0
        self.dropped = 0
        self.outages = 0
        # An outage (deliveries failing for a reason retrying can fix) is logged once when it
        # starts and once when it ends; the attempts in between only at DEBUG.
        self._outage_since: float | None = None
        self._spooled_before_outage = 0
        self._last_drop_log = 0.0
        self._metrics: dict[str, Counter] = {}
        if registry is not None:
            self._register_metrics(registry, metric_prefix)

    # -- metrics -----------------------------------------------------------------------

    def _register_metrics(self, registry: CollectorRegistry, prefix: str) -> None:
        for counter, text in (
            ("published", "Events confirmed durable by the event bus"),
            ("retried", "Failed batches that were retried"),
            ("spooled", "Events written to the spool while the bus was unreachable"),
            ("dropped", "Events never delivered (buffer/spool full, rejected, or abandoned at stop)"),
            ("outages", "Times the event bus became unreachable (deliveries failing until it was back)"),
        ):
            self._metrics[counter] = Counter(f"{prefix}_{counter}", text, registry=registry)
        buffered = Gauge(
            f"{prefix}_buffered", "Events accepted, not spooled, not yet durable", registry=registry
        )
        buffered.set_function(lambda: float(self.buffered))
        pending = Gauge(f"{prefix}_spool_pending", "Events in the spool awaiting replay", registry=registry)
        pending.set_function(lambda: float(self.spool_pending))

    def _count(self, counter: str, amount: int = 1) -> None:
        if amount <= 0:
            return
        with self._lock:
            setattr(self, counter, getattr(self, counter) + amount)
        metric = self._metrics.get(counter)
        if metric is not None:
            metric.inc(amount)

    @property
    def buffered(self) -> int:
        """Events accepted by publish() that are neither confirmed nor in the spool."""
        with self._lock:
            return len(self._buffer) + self._in_flight

    @property
    def spool_pending(self) -> int:
        return self._spool.pending

    @property
    def healthy(self) -> bool:
        """False while events wait in the spool (the bus was unreachable)."""
        return self._spool.pending == 0

    # -- publishing --------------------------------------------------------------------

    def publish(self, topic: str, event: EncodedEvent) -> bool:
        """Buffer an event for publishing; never blocks, never raises. False when it was not accepted."""
        topic = self._topics.get(topic, topic)
        with self._lock:
            if not self._stopping and len(self._buffer) + self._in_flight < self.max_buffered:
                self._buffer.append((topic, event))
                # Wake the drainer for the first event (it lingers for more) and for a full batch;
                # waking it for every event would make it re-check its linger each time.
                if len(self._buffer) == 1:
                    self._oldest_buffered_at = time.monotonic()
                    self._has_work.notify()
                elif len(self._buffer) == self._max_batch:
                    self._has_work.notify()
                return True
        self._overflow(topic, "publisher stopped" if self._stopping else f"buffer full ({self.max_buffered})")
        return False

    def _overflow(self, topic: str, reason: str, count: int = 1) -> None:
        """The one place events that cannot be kept go: counted as dropped, logged at most every 10 s.

        The buffer does not overflow into the spool: publish() runs on the event loop and
        must not touch the disk, and only the drainer writes the spool, which is how the
        spool stays older than the buffer. The drainer moves the buffer to the spool within
        one flush_timeout_s, so the buffer fills only when events arrive faster than that.
        """
        self._count("dropped", count)
        now = time.monotonic()
        with self._lock:
            should_log = now - self._last_drop_log >= 10.0
            if should_log:
                self._last_drop_log = now
        if should_log:
            log.warning(
                "%s: dropping events for topic %s: %s; %d dropped so far",
                self._name,
                topic,
                reason,
                self.dropped,
            )

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            if self._stopping:
                raise RuntimeError("a stopped publisher cannot be restarted")
            self._thread = threading.Thread(target=self._drain_loop, name=self._name, daemon=True)
            self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop accepting events, deliver what is possible within timeout_s, spool or count the rest."""
        with self._lock:
            if self._stopped:
                return
            self._stopping = True
            self._has_work.notify_all()
            thread = self._thread
        if thread is None:
            # Never started: deliver the buffer from this thread, bounded by the same timeout.
            thread = threading.Thread(target=self._drain_loop, name=self._name, daemon=True)
            thread.start()
        thread.join(timeout_s)
        if thread.is_alive():
            self._abandon.set()
            with self._lock:
                self._has_work.notify_all()
            # The current step is bounded by flush_timeout_s; then the drainer spools and exits.
            thread.join(self._flush_timeout_s + 2.0)
        with self._lock:
            left = len(self._buffer) + self._in_flight
            self._buffer.clear()
            self._in_flight = 0
            self._stopped = True
        if left:
            self._count("dropped", left)
            log.error("%s: stopped with %d events neither delivered nor spooled (dropped)", self._name, left)
        if isinstance(self._spool, MemorySpool) and self._spool.pending:
            lost = self._spool.pending
            self._count("dropped", lost)
            log.error(
                "%s: stopped with %d undelivered events and no spool directory (dropped)", self._name, lost
            )
        elif self._spool.pending:
            log.warning("%s: %d events stay in the spool for the next start", self._name, self._spool.pending)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        # stop() joins a thread and may wait on the backend: keep it off the event loop.
        await asyncio.to_thread(self.stop)

    # -- the drainer thread ------------------------------------------------------------

    def _drain_loop(self) -> None:
        try:
            while self._next_step():
                pass
        except Exception:
            log.exception("%s: the drainer failed; events stay buffered/spooled", self._name)

    def _next_step(self) -> bool:
        """One unit of work; False when the drainer should exit."""
        backlog = self._spool.pending > 0
        with self._lock:
            while True:
                if self._abandon.is_set():
                    break
                now = time.monotonic()
                if backlog and now >= self._retry_at:
                    break
                if self._buffer:
                    linger_until = self._oldest_buffered_at + self._linger_s
                    full = len(self._buffer) >= self._max_batch
                    if backlog or self._stopping or full or now >= linger_until:
                        break
                    self._has_work.wait(linger_until - now)
                    continue
                if self._stopping and not backlog:
                    return False
                wait_s = max(0.0, self._retry_at - now) if backlog else None
                self._has_work.wait(wait_s)
            batch = [self._buffer.popleft() for _ in range(min(self._max_batch, len(self._buffer)))]
            self._in_flight += len(batch)
        if backlog or self._abandon.is_set():
            self._to_spool(batch)
            if self._abandon.is_set():
                # stop() gave up: leave the backlog in the spool, but spool the buffer first.
                with self._lock:
                    rest = list(self._buffer)
                    self._buffer.clear()
                    self._in_flight += len(rest)
                self._to_spool(rest)
                return False
            if time.monotonic() >= self._retry_at:
                self._replay_step()
            return True
        self._send_direct(batch)
        return True

    def _backoff(self) -> None:
        self._count("retried")
        delay = min(self._max_backoff_s, self._initial_backoff_s * (2 ** min(self._failures, 30)))
        self._failures += 1
        self._retry_at = time.monotonic() + delay

    def _to_spool(self, events: Sequence[tuple[str, EncodedEvent]]) -> None:
        """Append events taken from the buffer (or not delivered) to the spool tail."""
        if not events:
            return
        try:
            self._spool.append([encode_spooled(topic, event) for topic, event in events])
        except (SpoolFull, OSError) as exc:
            self._overflow(events[0][0], f"spool unavailable ({type(exc).__name__}: {exc})", len(events))
        else:
            self._count("spooled", len(events))
        with self._lock:
            self._in_flight -= len(events)

    def _deliver(self, events: Sequence[tuple[str, EncodedEvent]]) -> int:
        """One send_batch; returns how many events, from the head, are settled (delivered, or
        rejected for good and dropped). The rest must be sent again."""
        records = [ProducerRecord(topic, event.value, event.key, event.headers) for topic, event in events]
        try:
            self._producer.send_batch(records, timeout_s=self._flush_timeout_s)
        except DeliveryFailed as exc:
            retriable = set(exc.failed) - set(exc.permanent)
            if retriable:
                self._failed(f"{len(exc.failed)} of {len(events)} events not delivered: {exc}")
            settled = min((i for i in retriable if i < len(events)), default=len(events))
            rejected = sum(1 for i in set(exc.permanent) if i < settled)
            if rejected:
                self._overflow(events[0][0], f"rejected by the bus ({exc})", rejected)
            self._confirmed(settled - rejected)
        except Exception as exc:
            # The exception type only: its message could quote the payload.
            self._failed(f"sending a batch failed ({type(exc).__name__})")
            settled = 0
        else:
            self._confirmed(len(events))
            return len(events)
        if settled < len(events):
            self._backoff()
        return settled

    def _send_direct(self, batch: list[tuple[str, EncodedEvent]]) -> None:
        """Healthy path: one batch; what is not delivered becomes the spool head (it was empty)."""
        settled = self._deliver(batch)
        with self._lock:
            self._in_flight -= settled
        self._to_spool(batch[settled:])

    def _failed(self, why: str) -> None:
        """A delivery attempt failed: the first of an outage is logged, the rest only at DEBUG."""
        if self._outage_since is not None:
            log.debug("%s: still failing: %s", self._name, why)
            return
        self._outage_since = time.monotonic()
        self._spooled_before_outage = self.spooled
        self._count("outages")
        log.warning("%s: event bus unreachable (%s); spooling events until it is back", self._name, why)

    def _confirmed(self, count: int) -> None:
        if count > 0:
            self._count("published", count)
            self._failures = 0
            if self._outage_since is not None:
                length = time.monotonic() - self._outage_since
                self._outage_since = None
                log.warning(
                    "%s: event bus reachable again after %.1f s; %d event(s) spooled during the outage, "
                    "%d in the spool to replay",
                    self._name,
                    length,
                    self.spooled - self._spooled_before_outage,
                    self._spool.pending,
                )

    def _replay_step(self) -> None:
        """Backlog path: send the spool's head as one batch; acknowledge what was settled."""
        entries = self._spool.peek(self._max_batch)
        if not entries:
            return
        settled = self._deliver([decode_spooled(entry.payload) for entry in entries])
        if settled:
            self._spool.ack(entries[settled - 1])
