"""The events carried on the bus: topic names, headers, encode/decode.

Payloads are protobuf (snaplearn.events.v1); headers say what a payload is so that a
consumer can reject unknown types or versions without parsing them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from google.protobuf.timestamp_pb2 import Timestamp

from snaplearn.events.v1 import events_pb2
from snaplearn_common.errors import InvalidInput
from snaplearn_common.eventbus.base import Headers, Record

IMAGE_CLASSIFIED_TOPIC = "snaplearn.image-classified.v1"
HEADER_EVENT_TYPE = "event-type"
HEADER_SCHEMA_VERSION = "schema-version"
HEADER_EVENT_ID = "event-id"
IMAGE_CLASSIFIED_TYPE = "snaplearn.events.v1.ImageClassified"
SCHEMA_VERSION = "1"


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
    ts = Timestamp()
    ts.FromNanoseconds(int(time_s * 1e9))
    message = events_pb2.ImageClassified(
        event_id=event_id,
        user_id=user_id,
        time=ts,
        model_name=model_name,
        model_version=model_version,
        labels=[events_pb2.LabelScore(label=label, score=score) for label, score in labels],
    )
    headers: Headers = (
        (HEADER_EVENT_TYPE, IMAGE_CLASSIFIED_TYPE.encode()),
        (HEADER_SCHEMA_VERSION, SCHEMA_VERSION.encode()),
        (HEADER_EVENT_ID, event_id.encode()),
    )
    return EncodedEvent(key=user_id.encode(), value=message.SerializeToString(), headers=headers)


def decode_image_classified(record: Record) -> events_pb2.ImageClassified:
    """Parse a record; InvalidInput when its type/version is unknown or its payload is malformed."""
    event_type = record.header(HEADER_EVENT_TYPE)
    version = record.header(HEADER_SCHEMA_VERSION)
    if event_type is not None and event_type.decode(errors="replace") != IMAGE_CLASSIFIED_TYPE:
        raise InvalidInput(f"unexpected event type {event_type!r}")
    if version is not None and version.decode(errors="replace") != SCHEMA_VERSION:
        raise InvalidInput(f"unsupported schema version {version!r} (this consumer reads {SCHEMA_VERSION})")
    message = events_pb2.ImageClassified()
    try:
        message.ParseFromString(record.value)
    except Exception as exc:  # protobuf raises DecodeError, but also others on garbage
        raise InvalidInput(f"malformed ImageClassified payload: {exc}") from exc
    if not message.event_id or not message.user_id:
        raise InvalidInput("ImageClassified without event_id or user_id")
    return message
