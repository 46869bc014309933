"""The consume loop: events -> micro-batch -> model.apply -> new snapshot -> checkpoint.

Runs on its own thread so the asyncio gRPC server never waits for training.

Each event changes the model exactly once, across crashes, because the model is always
the result of a log prefix and knows which prefix:
- the worker tracks, per partition, the next offset the model expects (`positions`);
  records below it are redeliveries and skipped; a record above it (a rebalance or a
  group rejoin moved the fetch position to a committed offset the model is not at) makes
  the worker seek back. Whatever the committed offsets say, the model reads every offset
  once and in order;
- every `checkpoint_interval_s` (and on stop) the model, its event-id dedupe window and
  `positions` are saved in one file (temp, fsync, rename); only then are those offsets
  committed to the bus, so committed offsets never claim more than a checkpoint holds
  (they serve lag monitoring; a restart trusts the checkpoint);
- on start the worker restores the checkpoint and seeks every partition to its offsets
  (0 for a fresh model): events applied after the checkpoint died with the process and
  are applied again, to a model that has not seen them. The event-id window (part of the
  checkpoint) is the second line of defence, against an event *published* twice.
The bus may be unreachable at any time, at start included: the worker keeps trying to
subscribe (with backoff) instead of failing the process, keeps writing checkpoints on their
interval through an outage (they are local; the offset commit waits for the bus), and
reports an outage in two log lines, when it starts and when it ends, and in its counters.
Client calls that reach the bus between batches are bounded by short timeouts.

Without a checkpoint directory the model starts fresh on each start (from offset 0) and
offsets are committed after every batch.

The topic carries ImageClassified and FeedbackRecorded events (told apart by the
`event-type` header), applied to the model in log order. Records that cannot be decoded
(malformed payload, unknown type or schema version, feedback for an item that is not in the
model's catalog) go to the dead-letter topic `<topic>.dlq`, with the error and their origin in headers, before
their batch is applied; the partition keeps flowing. Dead-lettering is at-least-once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from snaplearn.events.v1 import events_pb2
from snaplearn_common.errors import NotFound, Unavailable
from snaplearn_common.eventbus.base import (
    Consumer,
    DeliveryFailed,
    EventBus,
    Headers,
    Producer,
    Record,
    TopicPartition,
)
from snaplearn_common.events import IMAGE_CLASSIFIED_TOPIC, decode_event
from snaplearn_recommender.checkpoint import Checkpointer
from snaplearn_recommender.metrics import RecommenderMetrics
from snaplearn_recommender.model import (
    CatalogChange,
    ClassifiedEvent,
    FeedbackEvent,
    ForgetEvent,
    ModelEvent,
    RecommenderModel,
)
from snaplearn_recommender.snapshot import Snapshot

log = logging.getLogger(__name__)


def _is_unreachable(exc: BaseException) -> bool:
    """An error that means "the bus cannot be reached now" (retry later), whichever backend.

    The backends raise Unavailable for a cluster they cannot reach; kafka-python's own
    timeouts and connection errors can surface from poll/commit too (matched by name, so this
    module does not import the optional kafka package)."""
    if isinstance(exc, Unavailable | TimeoutError | ConnectionError | DeliveryFailed):
        return True
    return any(
        cls.__module__.startswith("kafka")
        and (getattr(exc, "retriable", False) or "Timeout" in cls.__name__ or "Connection" in cls.__name__)
        for cls in type(exc).__mro__
    )


CONSUMER_GROUP = "snaplearn-recommender"
DEAD_LETTER_SUFFIX = ".dlq"
# Headers added to a dead-lettered record (its own headers are kept).
HEADER_DLQ_ERROR = "dlq-error"
HEADER_DLQ_TOPIC = "dlq-origin-topic"
HEADER_DLQ_PARTITION = "dlq-origin-partition"
HEADER_DLQ_OFFSET = "dlq-origin-offset"
HEADER_DLQ_CONSUMER_GROUP = "dlq-consumer-group"
_MAX_ERROR_CHARS = 500


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    topic: str = IMAGE_CLASSIFIED_TOPIC
    group_id: str = CONSUMER_GROUP
    topic_partitions: int = 4  # used only when the topic (or its dead-letter topic) does not exist yet
    batch_max_events: int = 256
    batch_max_wait_s: float = 0.05
    idle_poll_s: float = 0.2  # how long an idle poll waits; bounds the reaction time to stop()
    checkpoint_interval_s: float = 30.0
    dead_letter_flush_timeout_s: float = 10.0
    # Static group membership: a restart under the same id takes the partitions back at once
    # instead of after the crashed member's session timeout. "" = dynamic membership.
    instance_id: str = "trainer"
    # How often an idle worker asks the bus for end offsets (lag, and whether it is reachable).
    probe_interval_s: float = 1.0
    subscribe_backoff_max_s: float = 10.0

    @property
    def dead_letter_topic(self) -> str:
        return self.topic + DEAD_LETTER_SUFFIX


@dataclass(slots=True)
class WorkerStats:
    records_consumed: int = 0
    events_applied: int = 0
    feedback_applied: int = 0  # FeedbackRecorded events among events_applied
    duplicates: int = 0
    malformed: int = 0
    dead_lettered: int = 0
    redelivered: int = 0  # records below the model's position (skipped)
    rewinds: int = 0  # seeks back to the model's position after the fetch position jumped ahead
    batches: int = 0
    failed_batches: int = 0
    checkpoints: int = 0
    commit_failures: int = 0
    commits_skipped: int = 0  # offset commits not tried because the bus was unreachable
    bus_outages: int = 0  # times the bus became unreachable (at start included)
    bus_outage_seconds: float = 0.0  # total length of the outages that ended


class BusOutage:
    """Whether the bus is reachable, as the worker's own calls found it; logs each transition once."""

    def __init__(self, stats: WorkerStats, describe: str) -> None:
        self._stats = stats
        self._describe = describe
        self.down_since: float | None = None
        self._last_error = ""

    @property
    def down(self) -> bool:
        return self.down_since is not None

    def failed(self, doing: str, exc: BaseException) -> None:
        self._last_error = f"{type(exc).__name__}: {exc}"
        if self.down_since is not None:
            log.debug("event bus still unreachable (%s while %s)", self._last_error, doing)
            return
        self.down_since = time.monotonic()
        self._stats.bus_outages += 1
        log.warning(
            "event bus %s unreachable while %s (%s); retrying with backoff, checkpoints continue",
            self._describe,
            doing,
            self._last_error,
        )

    def recovered(self, detail: str) -> None:
        if self.down_since is None:
            return
        length = time.monotonic() - self.down_since
        self.down_since = None
        self._stats.bus_outage_seconds += length
        log.warning("event bus %s reachable again after %.1f s; %s", self._describe, length, detail)


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
        # Next offset the model expects per partition: what it has applied, nothing else.
        self._positions: dict[TopicPartition, int] = dict(resume_offsets or {})
        self.stats = WorkerStats()
        self._stop = threading.Event()
        self._ready = threading.Event()  # the first subscription attempt ended (or the thread did)
        self._subscribed = threading.Event()
        # Called on the worker's thread once it has subscribed (the app turns readiness on).
        self.on_subscribed: Callable[[], object] | None = None
        self.outage = BusOutage(self.stats, f"(topic {self.settings.topic})")
        self._partitions: list[TopicPartition] = []
        self._consumer: Consumer | None = None  # set once subscribed (the worker thread's own)
        self._next_probe = 0.0
        self._probe_backoff_s = self.settings.probe_interval_s
        self._startup_error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._last_checkpoint = time.monotonic()
        self._dead_letters: Producer | None = None
        self._rewound_to: dict[TopicPartition, int] = {}

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def positions(self) -> dict[TopicPartition, int]:
        """A copy of the next offset the model expects, per partition."""
        return dict(self._positions)

    @property
    def subscribed(self) -> bool:
        """True once the worker has subscribed to the bus (it then stays subscribed)."""
        return self._subscribed.is_set()

    def wait_subscribed(self, timeout_s: float | None = None) -> bool:
        return self._subscribed.wait(timeout_s)

    def start(self, timeout_s: float = 30.0) -> bool:
        """Start the thread; return once its first subscription attempt ended, or after timeout_s.

        True if subscribed. An unreachable bus is not an error: the thread keeps trying, with
        backoff, and says so in the log. A setup error that retrying cannot fix (a bad topic
        name, a refused configuration) on the first attempt is raised here.
        """
        if self._thread is not None:
            raise RuntimeError("worker already started")
        self._thread = threading.Thread(target=self._run, name="recommender-worker", daemon=True)
        self._thread.start()
        self._ready.wait(timeout_s)
        if self._startup_error is not None:
            raise self._startup_error
        return self.subscribed

    def stop(self, timeout_s: float = 30.0) -> None:
        """Finish the current batch, checkpoint, commit and leave the consumer group."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.error("recommender worker did not stop within %.0f s", timeout_s)

    # --- the thread -----------------------------------------------------------------------------

    def _run(self) -> None:
        consumer: Consumer | None = None
        try:
            consumer = self._subscribe_until_stopped()
            if consumer is None:
                return
            self._consumer = consumer
            backoff_s = 0.5
            while not self._stop.is_set():
                try:
                    self._step(consumer)
                    backoff_s = 0.5
                except Exception as exc:
                    # E.g. the cluster went away mid-call. The model and positions are intact
                    # (a batch is applied whole or not at all), so carry on after a pause, and
                    # keep checkpointing meanwhile.
                    if _is_unreachable(exc):
                        self.outage.failed("polling", exc)
                    else:
                        log.exception("recommender worker step failed; retrying in %.1f s", backoff_s)
                    self._checkpoint_if_due(consumer)
                    self._stop.wait(backoff_s)
                    backoff_s = min(5.0, self.settings.checkpoint_interval_s, backoff_s * 2)
        finally:
            self._ready.set()
            self._finish(consumer)

    def _subscribe_until_stopped(self) -> Consumer | None:
        """Subscribe, retrying with backoff while the bus is unreachable; None if stopped first."""
        backoff_s = 1.0
        first = True
        while not self._stop.is_set():
            try:
                consumer = self._subscribe()
            except Exception as exc:
                if first and not _is_unreachable(exc):
                    self._startup_error = exc
                    return None
                self.outage.failed(
                    "subscribing (readiness follows the first subscription unless a checkpoint was restored)",
                    exc,
                )
                self._ready.set()
                first = False
                if self._stop.wait(backoff_s):
                    return None
                backoff_s = min(self.settings.subscribe_backoff_max_s, backoff_s * 2)
                continue
            self.outage.recovered("subscribed")
            self._subscribed.set()
            if self.on_subscribed is not None:
                try:
                    self.on_subscribed()
                except Exception:  # e.g. the app's loop already closed: consuming goes on
                    log.exception("the on_subscribed callback failed")
            self._ready.set()
            return consumer
        return None

    def _subscribe(self) -> Consumer:
        topic = self.settings.topic
        self._bus.create_topic(topic, self.settings.topic_partitions)
        self._bus.create_topic(self.settings.dead_letter_topic, self.settings.topic_partitions)
        partitions = self._bus.partitions_for(topic)
        if self._dead_letters is None:
            self._dead_letters = self._bus.producer()
        consumer = self._bus.consumer(
            self.settings.group_id, [topic], instance_id=self.settings.instance_id or None
        )
        # The model is the result of a log prefix: resume exactly where it stops (a fresh model,
        # or a partition the checkpoint has not read yet, starts at the beginning of the log).
        self._partitions = [TopicPartition(topic, partition) for partition in range(partitions)]
        for tp in self._partitions:
            consumer.seek(tp, self._positions.get(tp, 0))
        log.info(
            "recommender worker subscribed to %s as group %s%s",
            topic,
            self.settings.group_id,
            f" (instance {self.settings.instance_id})" if self.settings.instance_id else "",
        )
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

    def _in_sequence(self, consumer: Consumer, records: list[Record]) -> list[Record]:
        """The records that continue each partition exactly where the model stands.

        Below the model's position: a redelivery (the fetch position came from an older
        commit after a rebalance or a rejoin), skipped. Above it: the fetch position jumped
        past records the model has not applied, so seek back and drop this partition's
        records from the batch. If the same jump repeats right after that seek, the records
        in between are gone from the log (retention): accept, loudly.
        """
        kept: list[Record] = []
        expected: dict[TopicPartition, int] = {}
        rewinding: set[TopicPartition] = set()
        for record in records:
            tp = record.topic_partition
            if tp in rewinding:
                continue
            position = expected.get(tp, self._positions.get(tp))
            if position is not None and record.offset < position:
                self.stats.redelivered += 1
                continue
            if position is not None and record.offset > position:
                if self._rewound_to.get(tp) != position:
                    self._rewound_to[tp] = position
                    self.stats.rewinds += 1
                    log.info(
                        "%s: fetched from offset %d, the model is at %d; seeking back",
                        tp,
                        record.offset,
                        position,
                    )
                    consumer.seek(tp, position)
                    rewinding.add(tp)
                    continue
                log.error(
                    "%s: offsets %d..%d are no longer in the log; skipping them",
                    tp,
                    position,
                    record.offset - 1,
                )
            self._rewound_to.pop(tp, None)
            expected[tp] = record.offset + 1
            kept.append(record)
        return kept

    def _decode_one(self, record: Record) -> ModelEvent:
        message = decode_event(record)
        if isinstance(message, events_pb2.ImageClassified):
            return ClassifiedEvent.from_proto(message)
        if isinstance(message, events_pb2.StudentForgotten):  # a tombstone (ForgetStudent)
            return ForgetEvent.from_proto(message)
        change = CatalogChange.from_proto(message)  # catalog add / change / retire (issue 20)
        if change is not None:
            if change.item is not None:  # feedback later in this batch may name it
                self._batch_items.add(change.item_id)
            return change
        assert isinstance(message, events_pb2.FeedbackRecorded)
        event = FeedbackEvent.from_proto(message)
        # RecordFeedback checked the item against its snapshot's catalog, but a replica may run
        # another catalog; the model cannot learn from an item it does not have.
        if not self._model.has_item(event.item_id) and event.item_id not in self._batch_items:
            raise NotFound(f"feedback for item {event.item_id!r}, which is not in the model's catalog")
        return event

    def _decode(self, records: list[Record]) -> tuple[list[ModelEvent], list[tuple[Record, Exception]]]:
        events: list[ModelEvent] = []
        bad: list[tuple[Record, Exception]] = []
        self._batch_items: set[str] = set()  # items added by catalog changes earlier in this batch
        for record in records:
            try:
                events.append(self._decode_one(record))
            except Exception as exc:  # the payload is never logged, only where it is and why
                bad.append((record, exc))
                log.warning(
                    "dead-lettering record %s[%d]@%d: %s: %s",
                    record.topic,
                    record.partition,
                    record.offset,
                    type(exc).__name__,
                    exc,
                )
        return events, bad

    def _step(self, consumer: Consumer) -> None:
        records = self._collect(consumer)
        if records:
            records = self._in_sequence(consumer, records)
        if records:
            started = time.perf_counter()
            if not self._apply(records):
                return  # stopped while the dead-letter topic was unreachable: not applied
            for record in records:
                self._positions[record.topic_partition] = record.offset + 1
            if self._checkpointer is None:
                self._commit(consumer, self._positions)
            if self._metrics:
                self._metrics.batch_size.observe(len(records))
                self._metrics.batch_duration.observe(time.perf_counter() - started)
            self.outage.recovered(f"applied a batch of {len(records)} record(s)")
            self._probe(consumer, force=True)
        else:
            self._probe(consumer)
        self._checkpoint_if_due(consumer)

    def _checkpoint_if_due(self, consumer: Consumer) -> None:
        if (
            self._checkpointer
            and time.monotonic() - self._last_checkpoint >= self.settings.checkpoint_interval_s
        ):
            self._checkpoint(consumer)

    def _apply(self, records: list[Record]) -> bool:
        """Dead-letter what cannot be decoded, then apply the rest; False if stopped before that."""
        events, bad = self._decode(records)
        if bad:
            if not self._dead_letter(bad):
                return False
            self.stats.malformed += len(bad)
            self.stats.dead_lettered += len(bad)
            if self._metrics:
                self._metrics.malformed_events.inc(len(bad))
        self.stats.records_consumed += len(records)
        try:
            result = self._model.apply(events)
        except Exception:
            # Counted as applied anyway: retrying the same batch would fail the same way. The
            # ids are already in the dedupe window, so a replay would not apply them either.
            self.stats.failed_batches += 1
            if self._metrics:
                self._metrics.failed_batches.inc()
            log.exception("model update failed for a batch of %d events; skipped", len(events))
            return True
        snapshot = self._model.snapshot()
        self._publish(snapshot)
        self.stats.batches += 1
        self.stats.events_applied += result.applied
        self.stats.feedback_applied += result.feedback
        self.stats.duplicates += result.duplicates
        if self._metrics:
            self._metrics.events_applied.inc(result.applied)
            self._metrics.duplicate_events.inc(result.duplicates)
            self._metrics.known_users.set(snapshot.n_users)
        return True

    def _dead_letter_headers(self, record: Record, error: Exception) -> Headers:
        message = f"{type(error).__name__}: {error}"[:_MAX_ERROR_CHARS]
        return (
            *record.headers,
            (HEADER_DLQ_ERROR, message.encode()),
            (HEADER_DLQ_TOPIC, record.topic.encode()),
            (HEADER_DLQ_PARTITION, str(record.partition).encode()),
            (HEADER_DLQ_OFFSET, str(record.offset).encode()),
            (HEADER_DLQ_CONSUMER_GROUP, self.settings.group_id.encode()),
        )

    def _dead_letter(self, bad: list[tuple[Record, Exception]]) -> bool:
        """Write the records to the dead-letter topic, retrying until durable; False if stopped first."""
        producer = self._dead_letters
        assert producer is not None, "subscribe first"
        topic = self.settings.dead_letter_topic
        to_send = [(record.value, record.key, self._dead_letter_headers(record, exc)) for record, exc in bad]
        in_flight: list[tuple[bytes, bytes | None, Headers]] = []  # sent since the last completed flush
        backoff_s = 0.1
        while True:
            try:
                while to_send:
                    value, key, headers = to_send[0]
                    producer.send(topic, value, key=key, headers=headers)
                    in_flight.append(to_send.pop(0))
                producer.flush(timeout_s=self.settings.dead_letter_flush_timeout_s)
                return True
            except DeliveryFailed as exc:
                lost = set(exc.permanent)
                if lost:
                    log.error("the dead-letter topic rejected %d record(s) for good: %s", len(lost), exc)
                to_send = [in_flight[i] for i in exc.failed if i not in lost and i < len(in_flight)]
                in_flight = []
                if not to_send:
                    return True
                self.outage.failed("writing dead letters", exc)
            except Exception as exc:  # send failed, or flush timed out (the producer keeps those)
                if _is_unreachable(exc):
                    self.outage.failed("writing dead letters", exc)
                else:
                    log.warning(
                        "dead-letter write failed (%s); retrying in %.1f s", type(exc).__name__, backoff_s
                    )
            # The batch waits (it is not applied yet), the checkpoint need not: model and positions
            # are those before this batch.
            if self._consumer is not None:
                self._checkpoint_if_due(self._consumer)
            if self._stop.wait(backoff_s):
                return False
            backoff_s = min(5.0, backoff_s * 2)

    def _commit(self, consumer: Consumer, offsets: Mapping[TopicPartition, int]) -> None:
        """Commit the offsets of partitions this member owns; a failure is only logged (restarts
        trust the checkpoint, not the commits). Not tried while the bus is known to be down: the
        next checkpoint after the outage commits newer offsets."""
        if self.outage.down:
            self.stats.commits_skipped += 1
            return
        try:
            owned = consumer.assignment()
            mine = {tp: offset for tp, offset in offsets.items() if tp in owned}
            if mine:
                consumer.commit(mine)
        except Exception as exc:
            self.stats.commit_failures += 1
            if _is_unreachable(exc):
                self.outage.failed("committing offsets (the checkpoint holds them)", exc)
            else:
                log.warning(
                    "offset commit failed (%s: %s); the checkpoint still holds them",
                    type(exc).__name__,
                    exc,
                )

    def _probe(self, consumer: Consumer, force: bool = False) -> None:
        """Read the topic's end offsets: the lag gauge, and whether the bus is reachable.

        After every batch, else every probe_interval_s (backing off while the bus is down, so
        that bounded-but-blocking probes leave the loop time to checkpoint)."""
        now = time.monotonic()
        if not force and now < self._next_probe:
            return
        try:
            ends = consumer.end_offsets(self._partitions)
        except Exception as exc:
            if _is_unreachable(exc):
                self.outage.failed("reading end offsets", exc)
            else:
                log.debug("could not read end offsets for the lag gauge", exc_info=True)
            self._probe_backoff_s = min(5.0, self._probe_backoff_s * 2)
            self._next_probe = time.monotonic() + self._probe_backoff_s
            return
        self._probe_backoff_s = self.settings.probe_interval_s
        self._next_probe = time.monotonic() + self._probe_backoff_s
        assigned = consumer.assignment()
        lag = sum(max(0, end - self._positions.get(tp, 0)) for tp, end in ends.items() if tp in assigned)
        self.outage.recovered(f"{lag} event(s) to catch up on")
        if self._metrics:
            self._metrics.consumer_lag.set(lag)

    def _checkpoint(self, consumer: Consumer | None = None) -> None:
        """Save model + positions together; then (only then) commit those positions to the bus."""
        if not self._checkpointer:
            return
        positions = dict(self._positions)
        try:
            path = self._checkpointer.save(self._model, positions)
        except Exception:
            log.exception("could not write the checkpoint; will retry at the next interval")
        else:
            self.stats.checkpoints += 1
            log.debug("checkpoint written to %s (%d events applied)", path, self._model.events_applied)
            if consumer is not None:
                self._commit(consumer, positions)
        self._last_checkpoint = time.monotonic()

    def _finish(self, consumer: Consumer | None) -> None:
        if self._checkpointer:
            self._checkpoint(consumer)
        elif consumer is not None:
            self._commit(consumer, self._positions)
        for closeable, what in ((consumer, "consumer"), (self._dead_letters, "dead-letter producer")):
            if closeable is None:
                continue
            try:
                closeable.close()
            except Exception:
                log.exception("closing the %s failed", what)
