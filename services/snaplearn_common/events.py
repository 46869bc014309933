"""The events carried on the bus: topic names, headers, encode/decode.

Payloads are protobuf (snaplearn.events.v1); headers say what a payload is so that a
consumer can reject unknown types or versions without parsing them.

One topic carries every event about a student (ImageClassified from the vision server,
FeedbackRecorded from the recommender), keyed by user id: a student's events share a
partition and so keep their order, and the consumer's per-partition offsets and checkpoint
cover both kinds at once. The `event-type` header tells them apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from google.protobuf.timestamp_pb2 import Timestamp

from snaplearn.events.v1 import events_pb2
from snaplearn_common.errors import InvalidInput
from snaplearn_common.records import Headers, Record

IMAGE_CLASSIFIED_TOPIC = "snaplearn.image-classified.v1"
# The same topic on purpose (module docstring): per-student order across both kinds.
FEEDBACK_RECORDED_TOPIC = IMAGE_CLASSIFIED_TOPIC
HEADER_EVENT_TYPE = "event-type"
HEADER_SCHEMA_VERSION = "schema-version"
HEADER_EVENT_ID = "event-id"
IMAGE_CLASSIFIED_TYPE = "snaplearn.events.v1.ImageClassified"
FEEDBACK_RECORDED_TYPE = "snaplearn.events.v1.FeedbackRecorded"
# Catalog changes: the same topic too (so one offset order and checkpoint cover them); the
# publisher sends a copy to every partition (snaplearn_recommender.catalog_sync).
CATALOG_ITEM_ADDED_TYPE = "snaplearn.events.v1.CatalogItemAdded"
CATALOG_ITEM_CHANGED_TYPE = "snaplearn.events.v1.CatalogItemChanged"
CATALOG_ITEM_RETIRED_TYPE = "snaplearn.events.v1.CatalogItemRetired"
CatalogEvent = events_pb2.CatalogItemAdded | events_pb2.CatalogItemChanged | events_pb2.CatalogItemRetired
_CATALOG_MESSAGES: dict[str, type[CatalogEvent]] = {
    CATALOG_ITEM_ADDED_TYPE: events_pb2.CatalogItemAdded,
    CATALOG_ITEM_CHANGED_TYPE: events_pb2.CatalogItemChanged,
    CATALOG_ITEM_RETIRED_TYPE: events_pb2.CatalogItemRetired,
}
# A tombstone (ForgetStudent): keyed by user id like the student's events, so it follows them.
STUDENT_FORGOTTEN_TYPE = "snaplearn.events.v1.StudentForgotten"
SCHEMA_VERSION = "1"


class FeedbackKind(StrEnum):
    """What a student did with a recommended item (RecordFeedback)."""

    VIEWED = "viewed"
    COMPLETED = "completed"
    SKIPPED = "skipped"


_KIND_TO_PROTO = {
    FeedbackKind.VIEWED: events_pb2.FEEDBACK_KIND_VIEWED,
    FeedbackKind.COMPLETED: events_pb2.FEEDBACK_KIND_COMPLETED,
    FeedbackKind.SKIPPED: events_pb2.FEEDBACK_KIND_SKIPPED,
}
_PROTO_TO_KIND: dict[int, FeedbackKind] = {int(value): kind for kind, value in _KIND_TO_PROTO.items()}


_OUTCOME_TO_PROTO: dict[bool | None, events_pb2.AttemptOutcome] = {
    None: events_pb2.ATTEMPT_OUTCOME_UNSPECIFIED,
    True: events_pb2.ATTEMPT_OUTCOME_CORRECT,
    False: events_pb2.ATTEMPT_OUTCOME_INCORRECT,
}
_PROTO_TO_OUTCOME: dict[int, bool | None] = {int(value): key for key, value in _OUTCOME_TO_PROTO.items()}


def outcome_from_proto(value: int) -> bool | None:
    """A FeedbackRecorded outcome: True correct, False incorrect, None not an attempt;
    InvalidInput for an unknown value."""
    if value not in _PROTO_TO_OUTCOME:
        raise InvalidInput(f"unknown attempt outcome {value}")
    return _PROTO_TO_OUTCOME[value]


def feedback_kind_from_proto(value: int) -> FeedbackKind:
    """The kind of a FeedbackRecorded payload; InvalidInput for UNSPECIFIED or an unknown value."""
    kind = _PROTO_TO_KIND.get(value)
    if kind is None:
        raise InvalidInput(f"unknown feedback kind {value}")
    return kind


@dataclass(frozen=True, slots=True)
class EncodedEvent:
    key: bytes
    value: bytes
    headers: Headers


def encode_image_classified(
    event_id: str,
    user_id: str,
    time_s: float,
    model_name: str,
    model_version: str,
    labels: Sequence[tuple[str, float]],
) -> EncodedEvent:
    """Build the event for one prediction; the image itself is never part of it."""
    message = events_pb2.ImageClassified(
        event_id=event_id,
        user_id=user_id,
        time=_timestamp(time_s),
        model_name=model_name,
        model_version=model_version,
        labels=[events_pb2.LabelScore(label=label, score=score) for label, score in labels],
    )
    headers = _headers(IMAGE_CLASSIFIED_TYPE, event_id)
    return EncodedEvent(key=user_id.encode(), value=message.SerializeToString(), headers=headers)


def _headers(event_type: str, event_id: str) -> Headers:
    return (
        (HEADER_EVENT_TYPE, event_type.encode()),
        (HEADER_SCHEMA_VERSION, SCHEMA_VERSION.encode()),
        (HEADER_EVENT_ID, event_id.encode()),
    )


def _timestamp(time_s: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(time_s * 1e9))
    return ts


def check_score(score: float | None) -> None:
    """An attempt's score must be a number in [0, 1]; InvalidInput otherwise."""
    if score is not None and not 0.0 <= score <= 1.0:  # NaN fails both comparisons
        raise InvalidInput(f"score must be a number between 0 and 1, got {score}")


def attempt_correct(outcome: bool | None, score: float | None) -> bool | None:
    """Whether an attempt counts as correct: its outcome, else its score >= 0.5; None: no attempt."""
    if outcome is not None:
        return outcome
    return None if score is None else score >= 0.5


def encode_feedback_recorded(
    event_id: str,
    user_id: str,
    item_id: str,
    kind: FeedbackKind,
    time_s: float,
    outcome: bool | None = None,
    score: float | None = None,
) -> EncodedEvent:
    """Build the event for one RecordFeedback call (same topic and key as ImageClassified).

    outcome: True / False for a correct / incorrect attempt, None when it was not one."""
    check_score(score)
    message = events_pb2.FeedbackRecorded(
        event_id=event_id,
        user_id=user_id,
        item_id=item_id,
        kind=_KIND_TO_PROTO[kind],
        time=_timestamp(time_s),
        outcome=_OUTCOME_TO_PROTO[outcome],
    )
    if score is not None:
        message.score = score
    return EncodedEvent(
        key=user_id.encode(),
        value=message.SerializeToString(),
        headers=_headers(FEEDBACK_RECORDED_TYPE, event_id),
    )


def event_type(record: Record) -> str:
    """The record's event type; records without the header are ImageClassified (the first kind)."""
    header = record.header(HEADER_EVENT_TYPE)
    return IMAGE_CLASSIFIED_TYPE if header is None else header.decode(errors="replace")


def _check_version(record: Record) -> None:
    version = record.header(HEADER_SCHEMA_VERSION)
    if version is not None and version.decode(errors="replace") != SCHEMA_VERSION:
        raise InvalidInput(f"unsupported schema version {version!r} (this consumer reads {SCHEMA_VERSION})")


def decode_image_classified(record: Record) -> events_pb2.ImageClassified:
    """Parse a record; InvalidInput when its type/version is unknown or its payload is malformed."""
    if event_type(record) != IMAGE_CLASSIFIED_TYPE:
        raise InvalidInput(f"unexpected event type {record.header(HEADER_EVENT_TYPE)!r}")
    _check_version(record)
    message = events_pb2.ImageClassified()
    try:
        message.ParseFromString(record.value)
    except Exception as exc:  # protobuf raises DecodeError, but also others on garbage
        raise InvalidInput(f"malformed ImageClassified payload: {exc}") from exc
    if not message.event_id or not message.user_id:
        raise InvalidInput("ImageClassified without event_id or user_id")
    return message


def decode_feedback_recorded(record: Record) -> events_pb2.FeedbackRecorded:
    """Parse a FeedbackRecorded record; InvalidInput like decode_image_classified, and for an
    empty item id or an unknown kind."""
    if event_type(record) != FEEDBACK_RECORDED_TYPE:
        raise InvalidInput(f"unexpected event type {record.header(HEADER_EVENT_TYPE)!r}")
    _check_version(record)
    message = events_pb2.FeedbackRecorded()
    try:
        message.ParseFromString(record.value)
    except Exception as exc:
        raise InvalidInput(f"malformed FeedbackRecorded payload: {exc}") from exc
    if not message.event_id or not message.user_id or not message.item_id:
        raise InvalidInput("FeedbackRecorded without event_id, user_id or item_id")
    feedback_kind_from_proto(message.kind)
    outcome_from_proto(message.outcome)
    check_score(message.score if message.HasField("score") else None)
    return message


def encode_catalog_change(message: CatalogEvent) -> EncodedEvent:
    """A CatalogItemAdded / Changed / Retired message as a record (key: the item id; the publisher
    derives one key per partition from it)."""
    kind = next(name for name, cls in _CATALOG_MESSAGES.items() if isinstance(message, cls))
    item_id = message.item_id if isinstance(message, events_pb2.CatalogItemRetired) else message.item.item_id
    return EncodedEvent(
        key=item_id.encode(), value=message.SerializeToString(), headers=_headers(kind, message.event_id)
    )


def decode_catalog_change(record: Record) -> CatalogEvent:
    """Parse a catalog-change record; InvalidInput for a malformed one or one without ids/title."""
    kind = event_type(record)
    cls = _CATALOG_MESSAGES.get(kind)
    if cls is None:
        raise InvalidInput(f"unexpected event type {kind!r}")
    _check_version(record)
    message = cls()
    try:
        message.ParseFromString(record.value)
    except Exception as exc:
        raise InvalidInput(f"malformed {cls.__name__} payload: {exc}") from exc
    if isinstance(message, events_pb2.CatalogItemRetired):
        ok = bool(message.event_id and message.item_id)
    else:
        ok = bool(message.event_id and message.item.item_id and message.item.title)
    if not ok:
        raise InvalidInput(f"{cls.__name__} without event_id, item_id or title")
    return message


def encode_student_forgotten(event_id: str, user_id: str, time_s: float) -> EncodedEvent:
    """The tombstone for one student (same topic and key as the student's other events)."""
    message = events_pb2.StudentForgotten(event_id=event_id, user_id=user_id, time=_timestamp(time_s))
    return EncodedEvent(
        key=user_id.encode(),
        value=message.SerializeToString(),
        headers=_headers(STUDENT_FORGOTTEN_TYPE, event_id),
    )


def decode_student_forgotten(record: Record) -> events_pb2.StudentForgotten:
    """Parse a StudentForgotten record; InvalidInput for a malformed one or one without ids."""
    if event_type(record) != STUDENT_FORGOTTEN_TYPE:
        raise InvalidInput(f"unexpected event type {record.header(HEADER_EVENT_TYPE)!r}")
    _check_version(record)
    message = events_pb2.StudentForgotten()
    try:
        message.ParseFromString(record.value)
    except Exception as exc:
        raise InvalidInput(f"malformed StudentForgotten payload: {exc}") from exc
    if not message.event_id or not message.user_id:
        raise InvalidInput("StudentForgotten without event_id or user_id")
    return message


def decode_event(
    record: Record,
) -> events_pb2.ImageClassified | events_pb2.FeedbackRecorded | CatalogEvent | events_pb2.StudentForgotten:
    """Parse any event of this topic by its `event-type` header; InvalidInput for unknown types."""
    kind = event_type(record)
    if kind == IMAGE_CLASSIFIED_TYPE:
        return decode_image_classified(record)
    if kind == FEEDBACK_RECORDED_TYPE:
        return decode_feedback_recorded(record)
    if kind in _CATALOG_MESSAGES:
        return decode_catalog_change(record)
    if kind == STUDENT_FORGOTTEN_TYPE:
        return decode_student_forgotten(record)
    raise InvalidInput(f"unexpected event type {kind!r}")
