import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from rm_client.api.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ScoreItem(_message.Message):
    __slots__ = ("id", "prompt", "completion")
    ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_FIELD_NUMBER: _ClassVar[int]
    id: str
    prompt: _containers.RepeatedCompositeFieldContainer[_common_pb2.Message]
    completion: str
    def __init__(self, id: _Optional[str] = ..., prompt: _Optional[_Iterable[_Union[_common_pb2.Message, _Mapping]]] = ..., completion: _Optional[str] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("items", "model_version")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ScoreItem]
    model_version: str
    def __init__(self, items: _Optional[_Iterable[_Union[ScoreItem, _Mapping]]] = ..., model_version: _Optional[str] = ...) -> None: ...

class ScoreResult(_message.Message):
    __slots__ = ("id", "reward", "raw_score", "uncertainty", "num_tokens", "truncated", "members")
    ID_FIELD_NUMBER: _ClassVar[int]
    REWARD_FIELD_NUMBER: _ClassVar[int]
    RAW_SCORE_FIELD_NUMBER: _ClassVar[int]
    UNCERTAINTY_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    id: str
    reward: float
    raw_score: float
    uncertainty: float
    num_tokens: int
    truncated: bool
    members: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, id: _Optional[str] = ..., reward: _Optional[float] = ..., raw_score: _Optional[float] = ..., uncertainty: _Optional[float] = ..., num_tokens: _Optional[int] = ..., truncated: _Optional[bool] = ..., members: _Optional[_Iterable[float]] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("results", "model_version", "format_hash")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    FORMAT_HASH_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[ScoreResult]
    model_version: str
    format_hash: str
    def __init__(self, results: _Optional[_Iterable[_Union[ScoreResult, _Mapping]]] = ..., model_version: _Optional[str] = ..., format_hash: _Optional[str] = ...) -> None: ...

class ScoreTurnsRequest(_message.Message):
    __slots__ = ("conversation", "model_version")
    CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    conversation: _containers.RepeatedCompositeFieldContainer[_common_pb2.Message]
    model_version: str
    def __init__(self, conversation: _Optional[_Iterable[_Union[_common_pb2.Message, _Mapping]]] = ..., model_version: _Optional[str] = ...) -> None: ...

class TurnReward(_message.Message):
    __slots__ = ("message_index", "reward", "raw_score", "thumb_up", "session_credit")
    MESSAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    REWARD_FIELD_NUMBER: _ClassVar[int]
    RAW_SCORE_FIELD_NUMBER: _ClassVar[int]
    THUMB_UP_FIELD_NUMBER: _ClassVar[int]
    SESSION_CREDIT_FIELD_NUMBER: _ClassVar[int]
    message_index: int
    reward: float
    raw_score: float
    thumb_up: float
    session_credit: float
    def __init__(self, message_index: _Optional[int] = ..., reward: _Optional[float] = ..., raw_score: _Optional[float] = ..., thumb_up: _Optional[float] = ..., session_credit: _Optional[float] = ...) -> None: ...

class ScoreTurnsResponse(_message.Message):
    __slots__ = ("turns", "model_version", "format_hash", "session_value", "session_success")
    TURNS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    FORMAT_HASH_FIELD_NUMBER: _ClassVar[int]
    SESSION_VALUE_FIELD_NUMBER: _ClassVar[int]
    SESSION_SUCCESS_FIELD_NUMBER: _ClassVar[int]
    turns: _containers.RepeatedCompositeFieldContainer[TurnReward]
    model_version: str
    format_hash: str
    session_value: float
    session_success: float
    def __init__(self, turns: _Optional[_Iterable[_Union[TurnReward, _Mapping]]] = ..., model_version: _Optional[str] = ..., format_hash: _Optional[str] = ..., session_value: _Optional[float] = ..., session_success: _Optional[float] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: str
    def __init__(self, version: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("version", "parent", "snapshot_id", "backbone", "status", "format_hash", "metrics", "created_at", "reward_mean", "reward_std", "ensemble_size", "loaded", "precision", "backend", "weight_bytes", "device")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PARENT_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_ID_FIELD_NUMBER: _ClassVar[int]
    BACKBONE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    FORMAT_HASH_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    REWARD_MEAN_FIELD_NUMBER: _ClassVar[int]
    REWARD_STD_FIELD_NUMBER: _ClassVar[int]
    ENSEMBLE_SIZE_FIELD_NUMBER: _ClassVar[int]
    LOADED_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    version: str
    parent: str
    snapshot_id: str
    backbone: str
    status: str
    format_hash: str
    metrics: _containers.ScalarMap[str, float]
    created_at: _timestamp_pb2.Timestamp
    reward_mean: float
    reward_std: float
    ensemble_size: int
    loaded: bool
    precision: str
    backend: str
    weight_bytes: int
    device: str
    def __init__(self, version: _Optional[str] = ..., parent: _Optional[str] = ..., snapshot_id: _Optional[str] = ..., backbone: _Optional[str] = ..., status: _Optional[str] = ..., format_hash: _Optional[str] = ..., metrics: _Optional[_Mapping[str, float]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., reward_mean: _Optional[float] = ..., reward_std: _Optional[float] = ..., ensemble_size: _Optional[int] = ..., loaded: _Optional[bool] = ..., precision: _Optional[str] = ..., backend: _Optional[str] = ..., weight_bytes: _Optional[int] = ..., device: _Optional[str] = ...) -> None: ...

class WatchModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelEvent(_message.Message):
    __slots__ = ("kind", "model")
    KIND_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    kind: str
    model: ModelInfo
    def __init__(self, kind: _Optional[str] = ..., model: _Optional[_Union[ModelInfo, _Mapping]] = ...) -> None: ...
