from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ClassifyStreamRequest(_message.Message):
    __slots__ = ("items", "cancel_ids")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    CANCEL_IDS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ClassifyStreamItem]
    cancel_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, items: _Optional[_Iterable[_Union[ClassifyStreamItem, _Mapping]]] = ..., cancel_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class ClassifyStreamItem(_message.Message):
    __slots__ = ("id", "request", "timeout_ms")
    ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    id: int
    request: ClassifyRequest
    timeout_ms: float
    def __init__(self, id: _Optional[int] = ..., request: _Optional[_Union[ClassifyRequest, _Mapping]] = ..., timeout_ms: _Optional[float] = ...) -> None: ...

class ClassifyStreamResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[ClassifyStreamResult]
    def __init__(self, results: _Optional[_Iterable[_Union[ClassifyStreamResult, _Mapping]]] = ...) -> None: ...

class ClassifyStreamResult(_message.Message):
    __slots__ = ("id", "code", "message", "response")
    ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    id: int
    code: int
    message: str
    response: ClassifyResponse
    def __init__(self, id: _Optional[int] = ..., code: _Optional[int] = ..., message: _Optional[str] = ..., response: _Optional[_Union[ClassifyResponse, _Mapping]] = ...) -> None: ...

class ClassifyRequest(_message.Message):
    __slots__ = ("user_id", "image", "top_k", "model_name", "model_version", "request_id")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    image: bytes
    top_k: int
    model_name: str
    model_version: str
    request_id: str
    def __init__(self, user_id: _Optional[str] = ..., image: _Optional[bytes] = ..., top_k: _Optional[int] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class LabelScore(_message.Message):
    __slots__ = ("label", "score")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    label: str
    score: float
    def __init__(self, label: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class ClassifyResponse(_message.Message):
    __slots__ = ("request_id", "labels", "model_name", "model_version", "queue_ms", "compute_ms", "batch_size", "not_recognised")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    NOT_RECOGNISED_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    labels: _containers.RepeatedCompositeFieldContainer[LabelScore]
    model_name: str
    model_version: str
    queue_ms: float
    compute_ms: float
    batch_size: int
    not_recognised: bool
    def __init__(self, request_id: _Optional[str] = ..., labels: _Optional[_Iterable[_Union[LabelScore, _Mapping]]] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., queue_ms: _Optional[float] = ..., compute_ms: _Optional[float] = ..., batch_size: _Optional[int] = ..., not_recognised: _Optional[bool] = ...) -> None: ...
