from rm_client.api.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LabelSource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LABEL_SOURCE_UNSPECIFIED: _ClassVar[LabelSource]
    HUMAN: _ClassVar[LabelSource]
    JUDGE: _ClassVar[LabelSource]
    IMPORT: _ClassVar[LabelSource]

class Thumb(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    THUMB_UNSPECIFIED: _ClassVar[Thumb]
    THUMB_UP: _ClassVar[Thumb]
    THUMB_DOWN: _ClassVar[Thumb]

class IngestStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INGEST_STATUS_UNSPECIFIED: _ClassVar[IngestStatus]
    INSERTED: _ClassVar[IngestStatus]
    DUPLICATE: _ClassVar[IngestStatus]
    REJECTED: _ClassVar[IngestStatus]
    CONFLICT: _ClassVar[IngestStatus]

class TaskKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_KIND_UNSPECIFIED: _ClassVar[TaskKind]
    RANKING: _ClassVar[TaskKind]
    SESSION: _ClassVar[TaskKind]
LABEL_SOURCE_UNSPECIFIED: LabelSource
HUMAN: LabelSource
JUDGE: LabelSource
IMPORT: LabelSource
THUMB_UNSPECIFIED: Thumb
THUMB_UP: Thumb
THUMB_DOWN: Thumb
INGEST_STATUS_UNSPECIFIED: IngestStatus
INSERTED: IngestStatus
DUPLICATE: IngestStatus
REJECTED: IngestStatus
CONFLICT: IngestStatus
TASK_KIND_UNSPECIFIED: TaskKind
RANKING: TaskKind
SESSION: TaskKind

class Label(_message.Message):
    __slots__ = ("label_id", "prompt", "responses", "ranks", "strength", "source", "annotator", "rationale", "metadata", "task_id")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    LABEL_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    RESPONSES_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    STRENGTH_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    ANNOTATOR_FIELD_NUMBER: _ClassVar[int]
    RATIONALE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    label_id: str
    prompt: _containers.RepeatedCompositeFieldContainer[_common_pb2.Message]
    responses: _containers.RepeatedScalarFieldContainer[str]
    ranks: _containers.RepeatedScalarFieldContainer[int]
    strength: float
    source: LabelSource
    annotator: str
    rationale: str
    metadata: _containers.ScalarMap[str, str]
    task_id: str
    def __init__(self, label_id: _Optional[str] = ..., prompt: _Optional[_Iterable[_Union[_common_pb2.Message, _Mapping]]] = ..., responses: _Optional[_Iterable[str]] = ..., ranks: _Optional[_Iterable[int]] = ..., strength: _Optional[float] = ..., source: _Optional[_Union[LabelSource, str]] = ..., annotator: _Optional[str] = ..., rationale: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., task_id: _Optional[str] = ...) -> None: ...

class TurnThumb(_message.Message):
    __slots__ = ("message_index", "thumb")
    MESSAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    THUMB_FIELD_NUMBER: _ClassVar[int]
    message_index: int
    thumb: Thumb
    def __init__(self, message_index: _Optional[int] = ..., thumb: _Optional[_Union[Thumb, str]] = ...) -> None: ...

class Feedback(_message.Message):
    __slots__ = ("label_id", "conversation", "thumbs", "outcome", "source", "annotator", "rationale", "metadata", "task_id")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    LABEL_ID_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    THUMBS_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    ANNOTATOR_FIELD_NUMBER: _ClassVar[int]
    RATIONALE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    label_id: str
    conversation: _containers.RepeatedCompositeFieldContainer[_common_pb2.Message]
    thumbs: _containers.RepeatedCompositeFieldContainer[TurnThumb]
    outcome: float
    source: LabelSource
    annotator: str
    rationale: str
    metadata: _containers.ScalarMap[str, str]
    task_id: str
    def __init__(self, label_id: _Optional[str] = ..., conversation: _Optional[_Iterable[_Union[_common_pb2.Message, _Mapping]]] = ..., thumbs: _Optional[_Iterable[_Union[TurnThumb, _Mapping]]] = ..., outcome: _Optional[float] = ..., source: _Optional[_Union[LabelSource, str]] = ..., annotator: _Optional[str] = ..., rationale: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., task_id: _Optional[str] = ...) -> None: ...

class IngestFeedbackRequest(_message.Message):
    __slots__ = ("feedback",)
    FEEDBACK_FIELD_NUMBER: _ClassVar[int]
    feedback: _containers.RepeatedCompositeFieldContainer[Feedback]
    def __init__(self, feedback: _Optional[_Iterable[_Union[Feedback, _Mapping]]] = ...) -> None: ...

class IngestLabelsRequest(_message.Message):
    __slots__ = ("labels",)
    LABELS_FIELD_NUMBER: _ClassVar[int]
    labels: _containers.RepeatedCompositeFieldContainer[Label]
    def __init__(self, labels: _Optional[_Iterable[_Union[Label, _Mapping]]] = ...) -> None: ...

class IngestResult(_message.Message):
    __slots__ = ("label_id", "status", "reason")
    LABEL_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    label_id: str
    status: IngestStatus
    reason: str
    def __init__(self, label_id: _Optional[str] = ..., status: _Optional[_Union[IngestStatus, str]] = ..., reason: _Optional[str] = ...) -> None: ...

class IngestLabelsResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[IngestResult]
    def __init__(self, results: _Optional[_Iterable[_Union[IngestResult, _Mapping]]] = ...) -> None: ...

class Candidate(_message.Message):
    __slots__ = ("prompt", "completions", "policy_version", "sampling", "priority")
    class SamplingEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    COMPLETIONS_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    prompt: _containers.RepeatedCompositeFieldContainer[_common_pb2.Message]
    completions: _containers.RepeatedScalarFieldContainer[str]
    policy_version: str
    sampling: _containers.ScalarMap[str, str]
    priority: int
    def __init__(self, prompt: _Optional[_Iterable[_Union[_common_pb2.Message, _Mapping]]] = ..., completions: _Optional[_Iterable[str]] = ..., policy_version: _Optional[str] = ..., sampling: _Optional[_Mapping[str, str]] = ..., priority: _Optional[int] = ...) -> None: ...

class SubmitCandidatesRequest(_message.Message):
    __slots__ = ("candidates",)
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    candidates: _containers.RepeatedCompositeFieldContainer[Candidate]
    def __init__(self, candidates: _Optional[_Iterable[_Union[Candidate, _Mapping]]] = ...) -> None: ...

class SubmitCandidatesResponse(_message.Message):
    __slots__ = ("task_ids",)
    TASK_IDS_FIELD_NUMBER: _ClassVar[int]
    task_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, task_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class SessionCandidate(_message.Message):
    __slots__ = ("conversation", "policy_version", "sampling", "priority")
    class SamplingEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    conversation: _containers.RepeatedCompositeFieldContainer[_common_pb2.Message]
    policy_version: str
    sampling: _containers.ScalarMap[str, str]
    priority: int
    def __init__(self, conversation: _Optional[_Iterable[_Union[_common_pb2.Message, _Mapping]]] = ..., policy_version: _Optional[str] = ..., sampling: _Optional[_Mapping[str, str]] = ..., priority: _Optional[int] = ...) -> None: ...

class SubmitSessionsRequest(_message.Message):
    __slots__ = ("sessions",)
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    sessions: _containers.RepeatedCompositeFieldContainer[SessionCandidate]
    def __init__(self, sessions: _Optional[_Iterable[_Union[SessionCandidate, _Mapping]]] = ...) -> None: ...

class LeaseTasksRequest(_message.Message):
    __slots__ = ("owner", "max_tasks", "lease_seconds", "kinds")
    OWNER_FIELD_NUMBER: _ClassVar[int]
    MAX_TASKS_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    KINDS_FIELD_NUMBER: _ClassVar[int]
    owner: str
    max_tasks: int
    lease_seconds: int
    kinds: _containers.RepeatedScalarFieldContainer[TaskKind]
    def __init__(self, owner: _Optional[str] = ..., max_tasks: _Optional[int] = ..., lease_seconds: _Optional[int] = ..., kinds: _Optional[_Iterable[_Union[TaskKind, str]]] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("task_id", "prompt", "completions", "policy_version", "lease_expires_unix_ms", "kind", "conversation")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    COMPLETIONS_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRES_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    prompt: _containers.RepeatedCompositeFieldContainer[_common_pb2.Message]
    completions: _containers.RepeatedScalarFieldContainer[str]
    policy_version: str
    lease_expires_unix_ms: int
    kind: TaskKind
    conversation: _containers.RepeatedCompositeFieldContainer[_common_pb2.Message]
    def __init__(self, task_id: _Optional[str] = ..., prompt: _Optional[_Iterable[_Union[_common_pb2.Message, _Mapping]]] = ..., completions: _Optional[_Iterable[str]] = ..., policy_version: _Optional[str] = ..., lease_expires_unix_ms: _Optional[int] = ..., kind: _Optional[_Union[TaskKind, str]] = ..., conversation: _Optional[_Iterable[_Union[_common_pb2.Message, _Mapping]]] = ...) -> None: ...

class LeaseTasksResponse(_message.Message):
    __slots__ = ("tasks",)
    TASKS_FIELD_NUMBER: _ClassVar[int]
    tasks: _containers.RepeatedCompositeFieldContainer[Task]
    def __init__(self, tasks: _Optional[_Iterable[_Union[Task, _Mapping]]] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ("since_snapshot_id",)
    SINCE_SNAPSHOT_ID_FIELD_NUMBER: _ClassVar[int]
    since_snapshot_id: str
    def __init__(self, since_snapshot_id: _Optional[str] = ...) -> None: ...

class Stats(_message.Message):
    __slots__ = ("labels_total", "labels_by_source", "conversations", "completions", "pairs", "latest_snapshot_id", "labels_since_snapshot", "queue_depth", "tasks_leased", "tasks_done", "judge_human_shared_pairs", "judge_human_agreement", "judge_human_kappa", "judge_swapped_pairs", "judge_position_bias_rate", "judge_longer_preferred", "human_longer_preferred", "feedback_labels", "thumbs", "outcomes", "judge_human_shared_thumbs", "judge_human_thumb_agreement", "judge_human_thumb_kappa", "judge_human_shared_outcomes", "judge_human_outcome_agreement", "session_queue_depth")
    class LabelsBySourceEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    LABELS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    LABELS_BY_SOURCE_FIELD_NUMBER: _ClassVar[int]
    CONVERSATIONS_FIELD_NUMBER: _ClassVar[int]
    COMPLETIONS_FIELD_NUMBER: _ClassVar[int]
    PAIRS_FIELD_NUMBER: _ClassVar[int]
    LATEST_SNAPSHOT_ID_FIELD_NUMBER: _ClassVar[int]
    LABELS_SINCE_SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    TASKS_LEASED_FIELD_NUMBER: _ClassVar[int]
    TASKS_DONE_FIELD_NUMBER: _ClassVar[int]
    JUDGE_HUMAN_SHARED_PAIRS_FIELD_NUMBER: _ClassVar[int]
    JUDGE_HUMAN_AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    JUDGE_HUMAN_KAPPA_FIELD_NUMBER: _ClassVar[int]
    JUDGE_SWAPPED_PAIRS_FIELD_NUMBER: _ClassVar[int]
    JUDGE_POSITION_BIAS_RATE_FIELD_NUMBER: _ClassVar[int]
    JUDGE_LONGER_PREFERRED_FIELD_NUMBER: _ClassVar[int]
    HUMAN_LONGER_PREFERRED_FIELD_NUMBER: _ClassVar[int]
    FEEDBACK_LABELS_FIELD_NUMBER: _ClassVar[int]
    THUMBS_FIELD_NUMBER: _ClassVar[int]
    OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    JUDGE_HUMAN_SHARED_THUMBS_FIELD_NUMBER: _ClassVar[int]
    JUDGE_HUMAN_THUMB_AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    JUDGE_HUMAN_THUMB_KAPPA_FIELD_NUMBER: _ClassVar[int]
    JUDGE_HUMAN_SHARED_OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    JUDGE_HUMAN_OUTCOME_AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    SESSION_QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    labels_total: int
    labels_by_source: _containers.ScalarMap[str, int]
    conversations: int
    completions: int
    pairs: int
    latest_snapshot_id: str
    labels_since_snapshot: int
    queue_depth: int
    tasks_leased: int
    tasks_done: int
    judge_human_shared_pairs: int
    judge_human_agreement: float
    judge_human_kappa: float
    judge_swapped_pairs: int
    judge_position_bias_rate: float
    judge_longer_preferred: float
    human_longer_preferred: float
    feedback_labels: int
    thumbs: int
    outcomes: int
    judge_human_shared_thumbs: int
    judge_human_thumb_agreement: float
    judge_human_thumb_kappa: float
    judge_human_shared_outcomes: int
    judge_human_outcome_agreement: float
    session_queue_depth: int
    def __init__(self, labels_total: _Optional[int] = ..., labels_by_source: _Optional[_Mapping[str, int]] = ..., conversations: _Optional[int] = ..., completions: _Optional[int] = ..., pairs: _Optional[int] = ..., latest_snapshot_id: _Optional[str] = ..., labels_since_snapshot: _Optional[int] = ..., queue_depth: _Optional[int] = ..., tasks_leased: _Optional[int] = ..., tasks_done: _Optional[int] = ..., judge_human_shared_pairs: _Optional[int] = ..., judge_human_agreement: _Optional[float] = ..., judge_human_kappa: _Optional[float] = ..., judge_swapped_pairs: _Optional[int] = ..., judge_position_bias_rate: _Optional[float] = ..., judge_longer_preferred: _Optional[float] = ..., human_longer_preferred: _Optional[float] = ..., feedback_labels: _Optional[int] = ..., thumbs: _Optional[int] = ..., outcomes: _Optional[int] = ..., judge_human_shared_thumbs: _Optional[int] = ..., judge_human_thumb_agreement: _Optional[float] = ..., judge_human_thumb_kappa: _Optional[float] = ..., judge_human_shared_outcomes: _Optional[int] = ..., judge_human_outcome_agreement: _Optional[float] = ..., session_queue_depth: _Optional[int] = ...) -> None: ...
