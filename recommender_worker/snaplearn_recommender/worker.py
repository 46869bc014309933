"""The consume loop: events -> micro-batch -> model.apply -> new snapshot -> commit.

Runs on its own thread so the asyncio gRPC server never waits for training. Delivery is
at-least-once: offsets are committed after the snapshot that includes a batch is
published, and the model drops events whose id it has already applied. Every
`checkpoint_interval_s` (and on stop) the model and the offsets it has applied are
checkpointed together; on start the consumer seeks to the checkpoint's offsets (or to the
start of the log for a fresh model), so the model is always the result of the log prefix.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from snaplearn_common.eventbus.base import Consumer, EventBus, Record, TopicPartition
from snaplearn_common.events import IMAGE_CLASSIFIED_TOPIC, decode_image_classified
from snaplearn_recommender.checkpoint import Checkpointer
from snaplearn_recommender.metrics import RecommenderMetrics
from snaplearn_recommender.model import ClassifiedEvent, RecommenderModel
from snaplearn_recommender.snapshot import Snapshot

log = logging.getLogger(__name__)

CONSUMER_GROUP = "snaplearn-recommender"


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    topic: str = IMAGE_CLASSIFIED_TOPIC
    group_id: str = CONSUMER_GROUP
    topic_partitions: int = 4  # used only when the topic does not exist yet
    batch_max_events: int = 256
    batch_max_wait_s: float = 0.05
    idle_poll_s: float = 0.2  # how long an idle poll waits; bounds the reaction time to stop()
    checkpoint_interval_s: float = 30.0


@dataclass(slots=True)
class WorkerStats:
    records_consumed: int = 0
    events_applied: int = 0
    duplicates: int = 0
    malformed: int = 0
    batches: int = 0
    failed_batches: int = 0
    checkpoints: int = 0


class RecommenderWorker:
    """Owns the model (single writer); publishes each new snapshot through `publish`."""

    def __init__(
        self,
        bus: EventBus,
        model: RecommenderModel,
        publish: Callable[[Snapshot], None],
        settings: WorkerSettings | None = None,
        metrics: RecommenderMetrics | None = None,
        checkpointer: Checkpointer | None = None,
        resume_offsets: Mapping[TopicPartition, int] | None = None,
    ) -> None:
        self.settings = settings or WorkerSettings()
        self._bus = bus
        self._model = model
        self._publish = publish
        self._metrics = metrics
        self._checkpointer = checkpointer
        self._positions: dict[TopicPartition, int] = dict(resume_offsets or {})
        self.stats = WorkerStats()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._last_checkpoint = time.monotonic()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, timeout_s: float = 30.0) -> None:
        """Start the thread and return once it is subscribed (raises what its setup raised)."""
        if self._thread is not None:
            raise RuntimeError("worker already started")
        self._thread = threading.Thread(target=self._run, name="recommender-worker", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise TimeoutError(f"recommender worker did not subscribe within {timeout_s} s")
        if self._startup_error is not None:
            raise self._startup_error

    def stop(self, timeout_s: float = 30.0) -> None:
        """Finish the current batch, commit, checkpoint and leave the consumer group."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.error("recommender worker did not stop within %.0f s", timeout_s)

    # --- the thread -----------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            consumer = self._subscribe()
        except BaseException as exc:
            self._startup_error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            while not self._stop.is_set():
                self._step(consumer)
        except Exception:
            log.exception("recommender worker stopped on an unexpected error")
        finally:
            self._finish(consumer)

    def _subscribe(self) -> Consumer:
        topic = self.settings.topic
        self._bus.create_topic(topic, self.settings.topic_partitions)
        consumer = self._bus.consumer(self.settings.group_id, [topic])
        # The model is the result of a log prefix: resume exactly where it stops (a fresh model,
        # or a partition the checkpoint has not read yet, starts at the beginning of the log).
        for partition in range(self._bus.partitions_for(topic)):
            tp = TopicPartition(topic, partition)
            consumer.seek(tp, self._positions.get(tp, 0))
        log.info("recommender worker subscribed to %s as group %s", topic, self.settings.group_id)
        return consumer

    def _collect(self, consumer: Consumer) -> list[Record]:
        """Up to batch_max_events records, waiting at most batch_max_wait_s after the first one."""
        limit = self.settings.batch_max_events
        records = consumer.poll(max_records=limit, timeout_s=self.settings.idle_poll_s)
        if not records:
            return records
        deadline = time.monotonic() + self.settings.batch_max_wait_s
        while len(records) < limit and not self._stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            records += consumer.poll(max_records=limit - len(records), timeout_s=remaining)
        return records

    def _decode(self, records: list[Record]) -> list[ClassifiedEvent]:
        events: list[ClassifiedEvent] = []
        for record in records:
            try:
                events.append(ClassifiedEvent.from_proto(decode_image_classified(record)))
            except Exception as exc:  # the payload is never logged, only where it is and why
                self.stats.malformed += 1
                if self._metrics:
                    self._metrics.malformed_events.inc()
                log.warning(
                    "skipping malformed record %s[%d]@%d: %s: %s",
                    record.topic,
                    record.partition,
                    record.offset,
                    type(exc).__name__,
                    exc,
                )
        return events

    def _step(self, consumer: Consumer) -> None:
        records = self._collect(consumer)
        if records:
            started = time.perf_counter()
            self._apply(records)
            for record in records:
                self._positions[record.topic_partition] = record.offset + 1
            consumer.commit({tp: self._positions[tp] for tp in {r.topic_partition for r in records}})
            if self._metrics:
                self._metrics.batch_size.observe(len(records))
                self._metrics.batch_duration.observe(time.perf_counter() - started)
            self._update_lag(consumer)
        if (
            self._checkpointer
            and time.monotonic() - self._last_checkpoint >= self.settings.checkpoint_interval_s
        ):
            self._checkpoint()

    def _apply(self, records: list[Record]) -> None:
        self.stats.records_consumed += len(records)
        events = self._decode(records)
        try:
            result = self._model.apply(events)
        except Exception:
            # Committed anyway: retrying the same batch would fail the same way. The ids are
            # already in the dedupe window, so a replay would not apply them either.
            self.stats.failed_batches += 1
            if self._metrics:
                self._metrics.failed_batches.inc()
            log.exception("model update failed for a batch of %d events; skipped", len(events))
            return
        snapshot = self._model.snapshot()
        self._publish(snapshot)
        self.stats.batches += 1
        self.stats.events_applied += result.applied
        self.stats.duplicates += result.duplicates
        if self._metrics:
            self._metrics.events_applied.inc(result.applied)
            self._metrics.duplicate_events.inc(result.duplicates)
            self._metrics.known_users.set(snapshot.n_users)

    def _update_lag(self, consumer: Consumer) -> None:
        if not self._metrics:
            return
        try:
            assigned = sorted(consumer.assignment())
            ends = consumer.end_offsets(assigned)
        except Exception:
            log.debug("could not read end offsets for the lag gauge", exc_info=True)
            return
        self._metrics.consumer_lag.set(
            sum(max(0, end - self._positions.get(tp, 0)) for tp, end in ends.items())
        )

    def _checkpoint(self) -> None:
        if not self._checkpointer:
            return
        try:
            path = self._checkpointer.save(self._model, self._positions)
        except Exception:
            log.exception("could not write the checkpoint; will retry at the next interval")
        else:
            self.stats.checkpoints += 1
            log.info("checkpoint written to %s (%d events applied)", path, self._model.events_applied)
        self._last_checkpoint = time.monotonic()

    def _finish(self, consumer: Consumer) -> None:
        try:
            # Only partitions this member owns: another member's progress is not ours to write.
            owned = {tp: offset for tp, offset in self._positions.items() if tp in consumer.assignment()}
            if owned:
                consumer.commit(owned)
        except Exception:
            log.exception("final offset commit failed; the next start replays from the checkpoint")
        self._checkpoint()
        try:
            consumer.close()
        except Exception:
            log.exception("closing the consumer failed")
