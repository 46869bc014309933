"""RecordFeedback's core: validate, then publish a FeedbackRecorded event (no gRPC, no model).

Feedback is not applied here. It goes onto the same event stream as ImageClassified (same
topic, keyed by user id), and the worker, the model's only writer, applies it in log order;
so it is checkpointed, replayed and deduplicated exactly like a photo, and a query replica
(which has no worker) records feedback the same way: it publishes, the trainer consumes.

Publishing is the non-blocking EventPublisher hand-off (bounded buffer, disk spool while
the bus is down); a full buffer is the only refusal, reported as Overloaded so that
clients back off. Calls run on the event loop thread only (the request-id memory is not
locked).
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from prometheus_client import CollectorRegistry

from snaplearn_common.errors import InvalidInput, NotFound, Overloaded, Unavailable
from snaplearn_common.eventbus.base import EventBus, Producer
from snaplearn_common.eventbus.publisher import EventPublisher
from snaplearn_common.eventbus.spool import DiskSpool
from snaplearn_common.events import (
    FEEDBACK_RECORDED_TOPIC,
    EncodedEvent,
    FeedbackKind,
    check_score,
    encode_feedback_recorded,
    encode_student_forgotten,
)
from snaplearn_common.ids import check_id
from snaplearn_recommender.model import RecentIds
from snaplearn_recommender.snapshot import Snapshot

# Client clocks drift; a time further ahead than this would move the model's event-time clock
# (and with it every student's skip window) into the future.
MAX_FUTURE_SKEW_S = 300.0
REMEMBERED_REQUEST_IDS = 10_000

_log = logging.getLogger(__name__)


class FeedbackSink(Protocol):
    """snaplearn_common.eventbus.publisher.EventPublisher: never blocks; False when refused."""

    def publish(self, topic: str, event: EncodedEvent) -> bool: ...


@dataclass(frozen=True, slots=True)
class FeedbackReceipt:
    event_id: str
    accepted: bool  # False: this request_id was recorded before (a retry); nothing published


class FeedbackRecorder:
    """snapshot: the current snapshot (its catalog says which item ids exist); raises
    Unavailable while there is none. topic: where the worker reads (the configured topic)."""

    def __init__(
        self,
        snapshot: Callable[[], Snapshot],
        sink: FeedbackSink,
        topic: str = FEEDBACK_RECORDED_TOPIC,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._snapshot = snapshot
        self._sink = sink
        self._topic = topic
        self._clock = clock
        self._recorded = RecentIds(REMEMBERED_REQUEST_IDS)

    def record(
        self,
        user_id: str,
        item_id: str,
        kind: FeedbackKind | None,
        request_id: str = "",
        time_s: float | None = None,
        outcome: bool | None = None,
        score: float | None = None,
    ) -> FeedbackReceipt:
        """Publish one feedback event; returns its id. Raises InvalidInput, NotFound, Overloaded.

        outcome / score: an attempt's (True correct, False incorrect; score in [0, 1])."""
        check_id("user_id", user_id)
        check_score(score)
        check_id("item_id", item_id)
        check_id("request_id", request_id, required=False)
        if kind is None:
            raise InvalidInput("kind must be one of viewed, completed, skipped")
        now = self._clock()
        if time_s is None:
            time_s = now
        elif not math.isfinite(time_s):
            raise InvalidInput(f"time must be a finite Unix time, got {time_s}")
        elif time_s < 0:
            # The model reads event times as Unix times (0 and below: undated); an earlier time
            # is a client bug, not a student's feedback.
            raise InvalidInput("time is before 1970-01-01T00:00:00Z; send when the student gave the feedback")
        elif time_s > now + MAX_FUTURE_SKEW_S:
            raise InvalidInput(
                f"time is {time_s - now:.0f} s ahead of the server's clock; at most "
                f"{MAX_FUTURE_SKEW_S:.0f} s of clock skew is accepted"
            )
        catalog = self._snapshot().catalog
        if catalog.position(item_id) is None:
            raise NotFound(f"unknown item_id {item_id!r}: not in this model's catalog ({len(catalog)} items)")
        if request_id and request_id in self._recorded:
            return FeedbackReceipt(event_id=request_id, accepted=False)
        event_id = request_id or str(uuid.uuid4())
        event = encode_feedback_recorded(event_id, user_id, item_id, kind, time_s, outcome, score)
        if not self._sink.publish(self._topic, event):
            raise Overloaded("too much feedback is waiting to be published; retry with backoff")
        if request_id:
            self._recorded.add(request_id)
        return FeedbackReceipt(event_id=event_id, accepted=True)

    def forget(self, user_id: str, request_id: str = "") -> FeedbackReceipt:
        """Publish a StudentForgotten tombstone for user_id (ForgetStudent). It goes on the same
        topic and key as the student's events, so the worker applies it after them. Any id is
        accepted, known or not: a replica's snapshot may lag, and forgetting twice is harmless.
        Raises InvalidInput, Overloaded."""
        check_id("user_id", user_id)
        check_id("request_id", request_id, required=False)
        if request_id and request_id in self._recorded:
            return FeedbackReceipt(event_id=request_id, accepted=False)
        event_id = request_id or str(uuid.uuid4())
        if not self._sink.publish(self._topic, encode_student_forgotten(event_id, user_id, self._clock())):
            raise Overloaded("too many events are waiting to be published; retry with backoff")
        if request_id:
            self._recorded.add(request_id)
        return FeedbackReceipt(event_id=event_id, accepted=True)


@dataclass
class FeedbackChannel:
    """The recorder with what it publishes through (producer, publisher, optional disk spool)."""

    recorder: FeedbackRecorder
    publisher: EventPublisher
    producer: Producer
    spool: DiskSpool | None

    @classmethod
    def open(
        cls,
        bus: EventBus,
        snapshot: Callable[[], Snapshot],
        topic: str,
        partitions: int,
        registry: CollectorRegistry | None = None,
        spool_dir: Path | None = None,
    ) -> FeedbackChannel:
        """Blocking (topic creation, spool recovery): call it off the event loop.

        spool_dir: where unconfirmed feedback waits across a bus outage and a restart (one
        process per directory: it is locked); None keeps it in memory only.
        """
        try:
            bus.create_topic(topic, partitions)  # idempotent; a query replica may start before the worker
        except Unavailable:
            # A query replica must come up while the bus restarts (a pod should not crash-loop on
            # it): the producer connects on its first batch and the publisher spools until then;
            # the trainer creates the topic once the bus is back.
            _log.warning(
                "event bus unreachable: topic %s is created once it is back; feedback is spooled", topic
            )
        spool = DiskSpool(spool_dir) if spool_dir is not None else None
        producer = bus.producer()
        publisher = EventPublisher(
            producer,
            spool=spool,
            registry=registry,
            metric_prefix="snaplearn_recommender_feedback_events",
            name="feedback-publisher",
        )
        publisher.start()
        return cls(FeedbackRecorder(snapshot, publisher, topic), publisher, producer, spool)

    def close(self, timeout_s: float = 10.0) -> None:
        """Deliver what is possible within timeout_s (the rest stays in a disk spool); blocking."""
        self.publisher.stop(timeout_s)
        self.producer.close()
        if self.spool is not None:
            self.spool.close()
