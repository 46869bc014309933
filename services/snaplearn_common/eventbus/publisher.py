"""EventPublisher: how a gRPC server publishes events without ever blocking or failing a request.

`publish` only appends to a bounded in-memory buffer (safe from the asyncio event loop);
a background thread drains the buffer into a Producer, flushing every `flush_interval_s`,
and retries with backoff while the backend fails. When the buffer is full the event goes
to `_overflow` (today: counted as dropped; an on-disk spool can take over that one method).

Payloads carry student data: nothing here logs a key, value or header.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from typing import Self

from prometheus_client import CollectorRegistry, Counter, Gauge

from snaplearn_common.eventbus.base import Producer
from snaplearn_common.events import EncodedEvent

log = logging.getLogger(__name__)


class EventPublisher:
    """Non-blocking, bounded, retrying publisher over a Producer (which the caller owns and closes).

    Lifecycle: start() -> publish()... -> stop(timeout_s). Events published before start()
    are buffered; stop() drains the buffer and flushes, giving up after timeout_s (what is
    left is counted as dropped). Also usable as `with` / `async with`.

    Counters (attributes, and Prometheus metrics when `registry` is given):
    published (durable in the bus), retried (failed send/flush attempts), dropped (never
    delivered: buffer full, published after stop, or abandoned at stop) and buffered (gauge:
    accepted but not yet durable).
    """

    def __init__(
        self,
        producer: Producer,
        *,
        max_buffered: int = 10_000,
        flush_interval_s: float = 0.05,
        max_batch: int = 500,
        retry_initial_backoff_s: float = 0.05,
        retry_max_backoff_s: float = 5.0,
        registry: CollectorRegistry | None = None,
        metric_prefix: str = "snaplearn_eventbus_publisher",
        name: str = "event-publisher",
    ) -> None:
        if max_buffered < 1:
            raise ValueError("max_buffered must be at least 1")
        self._producer = producer
        self.max_buffered = max_buffered
        self._flush_interval_s = flush_interval_s
        self._max_batch = max(1, max_batch)
        self._initial_backoff_s = retry_initial_backoff_s
        self._max_backoff_s = retry_max_backoff_s
        self._name = name
        # One lock for the buffer and the counters; held only for O(1) work, so publish()
        # never waits on I/O even while the drainer is stuck in a slow backend call.
        self._lock = threading.Lock()
        self._buffer: deque[tuple[str, EncodedEvent]] = deque()
        self._has_work = threading.Condition(self._lock)
        self._in_flight = 0  # taken from the buffer, sent or being sent, not yet flushed
        self._stopping = False  # no more publishes accepted; drain and exit
        self._abandon = threading.Event()  # stop() timed out: stop retrying now
        self._thread: threading.Thread | None = None
        self._stopped = False
        self.published = 0
        self.retried = 0
        self.dropped = 0
        self._last_drop_log = 0.0
        self._published_metric: Counter | None = None
        self._retried_metric: Counter | None = None
        self._dropped_metric: Counter | None = None
        if registry is not None:
            self._register_metrics(registry, metric_prefix)

    # -- metrics -----------------------------------------------------------------------

    def _register_metrics(self, registry: CollectorRegistry, prefix: str) -> None:
        self._published_metric = Counter(
            f"{prefix}_published", "Events made durable in the event bus", registry=registry
        )
        self._retried_metric = Counter(
            f"{prefix}_retried", "Failed send/flush attempts that were retried", registry=registry
        )
        self._dropped_metric = Counter(
            f"{prefix}_dropped",
            "Events never delivered (buffer full, or abandoned at stop)",
            registry=registry,
        )
        buffered = Gauge(f"{prefix}_buffered", "Events accepted but not yet durable", registry=registry)
        buffered.set_function(lambda: float(self.buffered))

    @property
    def buffered(self) -> int:
        """Events accepted by publish() and not yet durable (in the buffer or in flight)."""
        with self._lock:
            return len(self._buffer) + self._in_flight

    def _count_dropped_locked(self, count: int) -> None:
        self.dropped += count
        if self._dropped_metric is not None:
            self._dropped_metric.inc(count)

    # -- publishing --------------------------------------------------------------------

    def publish(self, topic: str, event: EncodedEvent) -> bool:
        """Buffer an event for publishing; never blocks, never raises. False when it was not accepted."""
        with self._lock:
            if not self._stopping and len(self._buffer) + self._in_flight < self.max_buffered:
                self._buffer.append((topic, event))
                self._has_work.notify()
                return True
        self._overflow(topic, event)
        return False

    def _overflow(self, topic: str, event: EncodedEvent) -> None:
        """The one place an event that cannot be buffered goes (an on-disk spool replaces this)."""
        with self._lock:
            self._count_dropped_locked(1)
            stopping = self._stopping
            now = time.monotonic()
            # Rate-limited: under overload this would otherwise log once per request.
            should_log = now - self._last_drop_log >= 10.0
            if should_log:
                self._last_drop_log = now
            dropped = self.dropped
        if should_log:
            reason = "publisher stopped" if stopping else f"buffer full ({self.max_buffered})"
            log.warning(
                "%s: dropping events for topic %s: %s; %d dropped so far", self._name, topic, reason, dropped
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
        """Stop accepting events, deliver what is buffered and flush; give up after timeout_s."""
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
            thread.join(max(1.0, self._flush_interval_s * 2))
        with self._lock:
            left = len(self._buffer) + self._in_flight
            self._buffer.clear()
            self._in_flight = 0
            self._stopped = True
            if left:
                self._count_dropped_locked(left)
        if left:
            log.error("%s: stopped with %d undelivered events (counted as dropped)", self._name, left)

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

    def _retry(self, attempt: int) -> bool:
        """Count a failed attempt and back off; False when stop() has given up."""
        with self._lock:
            self.retried += 1
            if self._retried_metric is not None:
                self._retried_metric.inc()
        backoff_s = min(self._max_backoff_s, self._initial_backoff_s * (2 ** min(attempt, 30)))
        return not self._abandon.wait(backoff_s)

    def _send_with_retry(self, topic: str, event: EncodedEvent) -> bool:
        attempt = 0
        while not self._abandon.is_set():
            try:
                self._producer.send(topic, event.value, key=event.key, headers=event.headers)
                return True
            except Exception as exc:
                # The exception type only: its message could quote the payload.
                log.warning("%s: send failed (%s); retrying", self._name, type(exc).__name__)
                if not self._retry(attempt):
                    return False
                attempt += 1
        return False

    def _flush_with_retry(self) -> bool:
        # A Producer keeps what it accepted until a flush succeeds, so retrying the flush
        # (not re-sending) delivers each event once.
        attempt = 0
        while not self._abandon.is_set():
            try:
                self._producer.flush()
                return True
            except Exception as exc:
                log.warning("%s: flush failed (%s); retrying", self._name, type(exc).__name__)
                if not self._retry(attempt):
                    return False
                attempt += 1
        return False

    def _drain_loop(self) -> None:
        # Flush when the buffer runs empty (low latency when idle) and at least every
        # flush_interval_s under sustained load (bounded loss window, fresh counters).
        next_flush_at = time.monotonic() + self._flush_interval_s
        while True:
            with self._lock:
                while not self._buffer and not self._stopping:
                    self._has_work.wait()
                if not self._buffer:
                    return  # stopping, and everything accepted has been flushed
                batch = [self._buffer.popleft() for _ in range(min(self._max_batch, len(self._buffer)))]
                self._in_flight += len(batch)
            for topic, event in batch:
                if not self._send_with_retry(topic, event):
                    return  # abandoned by stop(); it counts what is left
            with self._lock:
                buffer_empty = not self._buffer
            if buffer_empty or time.monotonic() >= next_flush_at:
                if not self._flush_with_retry():
                    return
                next_flush_at = time.monotonic() + self._flush_interval_s
                with self._lock:
                    delivered = self._in_flight
                    self._in_flight = 0
                    self.published += delivered
                    if self._published_metric is not None:
                        self._published_metric.inc(delivered)
