from rm_client.api.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Conversation(_message.Message):
    __slots__ = ("messages",)
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[_common_pb2.Message]
    def __init__(self, messages: _Optional[_Iterable[_Union[_common_pb2.Message, _Mapping]]] = ...) -> None: ...

class SimulateUserRequest(_message.Message):
    __slots__ = ("conversations", "model_version", "temperature", "top_p", "max_new_tokens", "seed")
    CONVERSATIONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    conversations: _containers.RepeatedCompositeFieldContainer[Conversation]
    model_version: str
    temperature: float
    top_p: float
    max_new_tokens: int
    seed: int
    def __init__(self, conversations: _Optional[_Iterable[_Union[Conversation, _Mapping]]] = ..., model_version: _Optional[str] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., max_new_tokens: _Optional[int] = ..., seed: _Optional[int] = ...) -> None: ...

class SimulatedTurn(_message.Message):
    __slots__ = ("content", "ended", "num_tokens", "end_probability", "complete", "truncated")
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    ENDED_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    END_PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    content: str
    ended: bool
    num_tokens: int
    end_probability: float
    complete: bool
    truncated: bool
    def __init__(self, content: _Optional[str] = ..., ended: _Optional[bool] = ..., num_tokens: _Optional[int] = ..., end_probability: _Optional[float] = ..., complete: _Optional[bool] = ..., truncated: _Optional[bool] = ...) -> None: ...

class SimulateUserResponse(_message.Message):
    __slots__ = ("results", "model_version", "seed")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[SimulatedTurn]
    model_version: str
    seed: int
    def __init__(self, results: _Optional[_Iterable[_Union[SimulatedTurn, _Mapping]]] = ..., model_version: _Optional[str] = ..., seed: _Optional[int] = ...) -> None: ...
