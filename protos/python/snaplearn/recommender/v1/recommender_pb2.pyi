import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FeedbackKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FEEDBACK_KIND_UNSPECIFIED: _ClassVar[FeedbackKind]
    FEEDBACK_KIND_VIEWED: _ClassVar[FeedbackKind]
    FEEDBACK_KIND_COMPLETED: _ClassVar[FeedbackKind]
    FEEDBACK_KIND_SKIPPED: _ClassVar[FeedbackKind]

class AttemptOutcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ATTEMPT_OUTCOME_UNSPECIFIED: _ClassVar[AttemptOutcome]
    ATTEMPT_OUTCOME_CORRECT: _ClassVar[AttemptOutcome]
    ATTEMPT_OUTCOME_INCORRECT: _ClassVar[AttemptOutcome]
FEEDBACK_KIND_UNSPECIFIED: FeedbackKind
FEEDBACK_KIND_VIEWED: FeedbackKind
FEEDBACK_KIND_COMPLETED: FeedbackKind
FEEDBACK_KIND_SKIPPED: FeedbackKind
ATTEMPT_OUTCOME_UNSPECIFIED: AttemptOutcome
ATTEMPT_OUTCOME_CORRECT: AttemptOutcome
ATTEMPT_OUTCOME_INCORRECT: AttemptOutcome

class RecommendFilters(_message.Message):
    __slots__ = ("grades", "formats", "concepts", "features")
    GRADES_FIELD_NUMBER: _ClassVar[int]
    FORMATS_FIELD_NUMBER: _ClassVar[int]
    CONCEPTS_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    grades: _containers.RepeatedScalarFieldContainer[int]
    formats: _containers.RepeatedScalarFieldContainer[str]
    concepts: _containers.RepeatedScalarFieldContainer[str]
    features: _containers.RepeatedCompositeFieldContainer[FeatureFilter]
    def __init__(self, grades: _Optional[_Iterable[int]] = ..., formats: _Optional[_Iterable[str]] = ..., concepts: _Optional[_Iterable[str]] = ..., features: _Optional[_Iterable[_Union[FeatureFilter, _Mapping]]] = ...) -> None: ...

class FeatureFilter(_message.Message):
    __slots__ = ("name", "values", "min", "max")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    MIN_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    name: str
    values: _containers.RepeatedScalarFieldContainer[str]
    min: float
    max: float
    def __init__(self, name: _Optional[str] = ..., values: _Optional[_Iterable[str]] = ..., min: _Optional[float] = ..., max: _Optional[float] = ...) -> None: ...

class ItemFeature(_message.Message):
    __slots__ = ("name", "values", "number")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    name: str
    values: _containers.RepeatedScalarFieldContainer[str]
    number: float
    def __init__(self, name: _Optional[str] = ..., values: _Optional[_Iterable[str]] = ..., number: _Optional[float] = ...) -> None: ...

class RecommendRequest(_message.Message):
    __slots__ = ("user_id", "k", "exclude_seen", "filters")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_SEEN_FIELD_NUMBER: _ClassVar[int]
    FILTERS_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    k: int
    exclude_seen: bool
    filters: RecommendFilters
    def __init__(self, user_id: _Optional[str] = ..., k: _Optional[int] = ..., exclude_seen: _Optional[bool] = ..., filters: _Optional[_Union[RecommendFilters, _Mapping]] = ...) -> None: ...

class RecommendedItem(_message.Message):
    __slots__ = ("item_id", "score", "title", "concepts", "grade", "format", "reason", "features", "prerequisites")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    CONCEPTS_FIELD_NUMBER: _ClassVar[int]
    GRADE_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    PREREQUISITES_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    score: float
    title: str
    concepts: _containers.RepeatedScalarFieldContainer[str]
    grade: int
    format: str
    reason: str
    features: _containers.RepeatedCompositeFieldContainer[ItemFeature]
    prerequisites: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, item_id: _Optional[str] = ..., score: _Optional[float] = ..., title: _Optional[str] = ..., concepts: _Optional[_Iterable[str]] = ..., grade: _Optional[int] = ..., format: _Optional[str] = ..., reason: _Optional[str] = ..., features: _Optional[_Iterable[_Union[ItemFeature, _Mapping]]] = ..., prerequisites: _Optional[_Iterable[str]] = ...) -> None: ...

class RecommendResponse(_message.Message):
    __slots__ = ("user_id", "items", "model_version", "cold_start", "events_applied")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    COLD_START_FIELD_NUMBER: _ClassVar[int]
    EVENTS_APPLIED_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    items: _containers.RepeatedCompositeFieldContainer[RecommendedItem]
    model_version: str
    cold_start: bool
    events_applied: int
    def __init__(self, user_id: _Optional[str] = ..., items: _Optional[_Iterable[_Union[RecommendedItem, _Mapping]]] = ..., model_version: _Optional[str] = ..., cold_start: _Optional[bool] = ..., events_applied: _Optional[int] = ...) -> None: ...

class SimilarItemsRequest(_message.Message):
    __slots__ = ("item_id", "k", "filters")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    FILTERS_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    k: int
    filters: RecommendFilters
    def __init__(self, item_id: _Optional[str] = ..., k: _Optional[int] = ..., filters: _Optional[_Union[RecommendFilters, _Mapping]] = ...) -> None: ...

class SimilarItemsResponse(_message.Message):
    __slots__ = ("item_id", "items", "model_version")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    items: _containers.RepeatedCompositeFieldContainer[RecommendedItem]
    model_version: str
    def __init__(self, item_id: _Optional[str] = ..., items: _Optional[_Iterable[_Union[RecommendedItem, _Mapping]]] = ..., model_version: _Optional[str] = ...) -> None: ...

class RecordFeedbackRequest(_message.Message):
    __slots__ = ("user_id", "item_id", "kind", "request_id", "time", "outcome", "score")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    item_id: str
    kind: FeedbackKind
    request_id: str
    time: _timestamp_pb2.Timestamp
    outcome: AttemptOutcome
    score: float
    def __init__(self, user_id: _Optional[str] = ..., item_id: _Optional[str] = ..., kind: _Optional[_Union[FeedbackKind, str]] = ..., request_id: _Optional[str] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., outcome: _Optional[_Union[AttemptOutcome, str]] = ..., score: _Optional[float] = ...) -> None: ...

class RecordFeedbackResponse(_message.Message):
    __slots__ = ("event_id", "accepted")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    accepted: bool
    def __init__(self, event_id: _Optional[str] = ..., accepted: _Optional[bool] = ...) -> None: ...

class GetStudentStateRequest(_message.Message):
    __slots__ = ("user_id", "k")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    k: int
    def __init__(self, user_id: _Optional[str] = ..., k: _Optional[int] = ...) -> None: ...

class GetStudentStateResponse(_message.Message):
    __slots__ = ("user_id", "concepts", "recent_attempts", "recommended", "model_version", "events_applied")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    CONCEPTS_FIELD_NUMBER: _ClassVar[int]
    RECENT_ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    RECOMMENDED_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    EVENTS_APPLIED_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    concepts: _containers.RepeatedCompositeFieldContainer[ConceptMastery]
    recent_attempts: _containers.RepeatedCompositeFieldContainer[StudentAttempt]
    recommended: _containers.RepeatedCompositeFieldContainer[RecommendedItem]
    model_version: str
    events_applied: int
    def __init__(self, user_id: _Optional[str] = ..., concepts: _Optional[_Iterable[_Union[ConceptMastery, _Mapping]]] = ..., recent_attempts: _Optional[_Iterable[_Union[StudentAttempt, _Mapping]]] = ..., recommended: _Optional[_Iterable[_Union[RecommendedItem, _Mapping]]] = ..., model_version: _Optional[str] = ..., events_applied: _Optional[int] = ...) -> None: ...

class ConceptMastery(_message.Message):
    __slots__ = ("concept", "mastery", "mastered", "correct", "incorrect")
    CONCEPT_FIELD_NUMBER: _ClassVar[int]
    MASTERY_FIELD_NUMBER: _ClassVar[int]
    MASTERED_FIELD_NUMBER: _ClassVar[int]
    CORRECT_FIELD_NUMBER: _ClassVar[int]
    INCORRECT_FIELD_NUMBER: _ClassVar[int]
    concept: str
    mastery: float
    mastered: bool
    correct: int
    incorrect: int
    def __init__(self, concept: _Optional[str] = ..., mastery: _Optional[float] = ..., mastered: _Optional[bool] = ..., correct: _Optional[int] = ..., incorrect: _Optional[int] = ...) -> None: ...

class StudentAttempt(_message.Message):
    __slots__ = ("item_id", "outcome", "score", "time", "predicted")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    outcome: AttemptOutcome
    score: float
    time: _timestamp_pb2.Timestamp
    predicted: float
    def __init__(self, item_id: _Optional[str] = ..., outcome: _Optional[_Union[AttemptOutcome, str]] = ..., score: _Optional[float] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., predicted: _Optional[float] = ...) -> None: ...

class ForgetStudentRequest(_message.Message):
    __slots__ = ("user_id", "request_id")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    request_id: str
    def __init__(self, user_id: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class ForgetStudentResponse(_message.Message):
    __slots__ = ("event_id", "accepted")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    accepted: bool
    def __init__(self, event_id: _Optional[str] = ..., accepted: _Optional[bool] = ...) -> None: ...
