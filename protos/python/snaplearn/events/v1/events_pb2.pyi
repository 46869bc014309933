import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AttemptOutcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ATTEMPT_OUTCOME_UNSPECIFIED: _ClassVar[AttemptOutcome]
    ATTEMPT_OUTCOME_CORRECT: _ClassVar[AttemptOutcome]
    ATTEMPT_OUTCOME_INCORRECT: _ClassVar[AttemptOutcome]

class FeedbackKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FEEDBACK_KIND_UNSPECIFIED: _ClassVar[FeedbackKind]
    FEEDBACK_KIND_VIEWED: _ClassVar[FeedbackKind]
    FEEDBACK_KIND_COMPLETED: _ClassVar[FeedbackKind]
    FEEDBACK_KIND_SKIPPED: _ClassVar[FeedbackKind]
ATTEMPT_OUTCOME_UNSPECIFIED: AttemptOutcome
ATTEMPT_OUTCOME_CORRECT: AttemptOutcome
ATTEMPT_OUTCOME_INCORRECT: AttemptOutcome
FEEDBACK_KIND_UNSPECIFIED: FeedbackKind
FEEDBACK_KIND_VIEWED: FeedbackKind
FEEDBACK_KIND_COMPLETED: FeedbackKind
FEEDBACK_KIND_SKIPPED: FeedbackKind

class ImageClassified(_message.Message):
    __slots__ = ("event_id", "user_id", "time", "model_name", "model_version", "labels")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    user_id: str
    time: _timestamp_pb2.Timestamp
    model_name: str
    model_version: str
    labels: _containers.RepeatedCompositeFieldContainer[LabelScore]
    def __init__(self, event_id: _Optional[str] = ..., user_id: _Optional[str] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., labels: _Optional[_Iterable[_Union[LabelScore, _Mapping]]] = ...) -> None: ...

class LabelScore(_message.Message):
    __slots__ = ("label", "score")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    label: str
    score: float
    def __init__(self, label: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class FeedbackRecorded(_message.Message):
    __slots__ = ("event_id", "user_id", "item_id", "kind", "time", "outcome", "score")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    user_id: str
    item_id: str
    kind: FeedbackKind
    time: _timestamp_pb2.Timestamp
    outcome: AttemptOutcome
    score: float
    def __init__(self, event_id: _Optional[str] = ..., user_id: _Optional[str] = ..., item_id: _Optional[str] = ..., kind: _Optional[_Union[FeedbackKind, str]] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., outcome: _Optional[_Union[AttemptOutcome, str]] = ..., score: _Optional[float] = ...) -> None: ...

class CatalogItem(_message.Message):
    __slots__ = ("item_id", "title", "concepts", "features", "prerequisites")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    CONCEPTS_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    PREREQUISITES_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    title: str
    concepts: _containers.RepeatedScalarFieldContainer[str]
    features: _containers.RepeatedCompositeFieldContainer[CatalogFeature]
    prerequisites: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, item_id: _Optional[str] = ..., title: _Optional[str] = ..., concepts: _Optional[_Iterable[str]] = ..., features: _Optional[_Iterable[_Union[CatalogFeature, _Mapping]]] = ..., prerequisites: _Optional[_Iterable[str]] = ...) -> None: ...

class CatalogFeature(_message.Message):
    __slots__ = ("name", "values", "number")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    name: str
    values: _containers.RepeatedScalarFieldContainer[str]
    number: float
    def __init__(self, name: _Optional[str] = ..., values: _Optional[_Iterable[str]] = ..., number: _Optional[float] = ...) -> None: ...

class CatalogItemAdded(_message.Message):
    __slots__ = ("event_id", "time", "item")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    ITEM_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    time: _timestamp_pb2.Timestamp
    item: CatalogItem
    def __init__(self, event_id: _Optional[str] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., item: _Optional[_Union[CatalogItem, _Mapping]] = ...) -> None: ...

class CatalogItemChanged(_message.Message):
    __slots__ = ("event_id", "time", "item")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    ITEM_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    time: _timestamp_pb2.Timestamp
    item: CatalogItem
    def __init__(self, event_id: _Optional[str] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., item: _Optional[_Union[CatalogItem, _Mapping]] = ...) -> None: ...

class CatalogItemRetired(_message.Message):
    __slots__ = ("event_id", "time", "item_id")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    time: _timestamp_pb2.Timestamp
    item_id: str
    def __init__(self, event_id: _Optional[str] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., item_id: _Optional[str] = ...) -> None: ...

class StudentForgotten(_message.Message):
    __slots__ = ("event_id", "time", "user_id")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    time: _timestamp_pb2.Timestamp
    user_id: str
    def __init__(self, event_id: _Optional[str] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., user_id: _Optional[str] = ...) -> None: ...
