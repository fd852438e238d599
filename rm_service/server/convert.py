"""proto <-> domain conversion, with validation errors that name the request field."""

from __future__ import annotations

import math

from rm_client.messages import to_proto
from rm_service.api.v1 import preference_pb2, reward_pb2
from rm_service.conversation import Message, validate_messages, validate_text
from rm_service.registry import ModelRecord
from rm_service.store.feedback import FeedbackIn, TurnThumb
from rm_service.store.labels import IngestOutcome, LabelIn

SOURCE_NAMES: dict[int, str] = {
    preference_pb2.HUMAN: "HUMAN",
    preference_pb2.JUDGE: "JUDGE",
    preference_pb2.IMPORT: "IMPORT",
}
STATUS_VALUES = {
    "INSERTED": preference_pb2.INSERTED,
    "DUPLICATE": preference_pb2.DUPLICATE,
    "REJECTED": preference_pb2.REJECTED,
    "CONFLICT": preference_pb2.CONFLICT,
}


def messages(pb_messages) -> list[Message]:
    return [Message(m.role, m.content) for m in pb_messages]


def score_items(request: reward_pb2.ScoreRequest, max_items: int, max_chars: int) -> list[tuple[list[Message], str]]:
    """Validated (prompt, completion) pairs of a Score request."""
    from rm_service.errors import InvalidArgument

    if not request.items:
        raise InvalidArgument("items", "must hold at least one item")
    if len(request.items) > max_items:
        raise InvalidArgument("items", f"holds {len(request.items)} items; the limit per request is {max_items}")
    out = []
    for i, item in enumerate(request.items):
        prompt = messages(item.prompt)
        validate_messages(prompt, f"items[{i}].prompt", max_chars)
        validate_text(item.completion, f"items[{i}].completion", max_chars)
        out.append((prompt, item.completion))
    return out


def source_name(value: int) -> str:
    """HUMAN | JUDGE | IMPORT, or what the store rejects by name (LABEL_SOURCE_UNSPECIFIED, a number)."""
    return SOURCE_NAMES.get(
        value, preference_pb2.LabelSource.Name(value) if value in preference_pb2.LabelSource.values() else str(value)
    )


THUMBS = {preference_pb2.THUMB_UP: True, preference_pb2.THUMB_DOWN: False}


def feedback(pb: preference_pb2.Feedback, where: str) -> FeedbackIn | IngestOutcome:
    """A proto feedback as the store takes it (Store.prepare validates it). A thumb that is
    neither up nor down has no value to store: that item is REJECTED, naming the field."""
    from rm_service.errors import InvalidArgument

    for i, t in enumerate(pb.thumbs):
        if t.thumb not in THUMBS:
            why = InvalidArgument(f"{where}.thumbs[{i}].thumb", f"must be THUMB_UP or THUMB_DOWN, got {t.thumb}")
            return IngestOutcome(pb.label_id, "REJECTED", str(why))
    return FeedbackIn(
        label_id=pb.label_id,
        conversation=messages(pb.conversation),
        thumbs=[TurnThumb(t.message_index, THUMBS[t.thumb]) for t in pb.thumbs],
        outcome=pb.outcome if pb.HasField("outcome") else None,
        source=source_name(pb.source),
        annotator=pb.annotator,
        rationale=pb.rationale,
        metadata=dict(pb.metadata),
        task_id=pb.task_id,
    )


def label(pb: preference_pb2.Label) -> LabelIn:
    """A proto label as the store takes it (the store validates it)."""
    return LabelIn(
        label_id=pb.label_id,
        prompt=messages(pb.prompt),
        responses=list(pb.responses),
        ranks=list(pb.ranks),
        source=source_name(pb.source),
        annotator=pb.annotator,
        strength=pb.strength if pb.HasField("strength") else None,
        rationale=pb.rationale,
        metadata=dict(pb.metadata),
        task_id=pb.task_id,
    )


def model_info(rec: ModelRecord, loaded: bool, served=None) -> reward_pb2.ModelInfo:
    """A version's record as the API shows it; `served` (a server.models.Served) adds how this
    process runs it: backend and precision."""
    info = reward_pb2.ModelInfo(
        version=rec.version,
        parent=rec.parent or "",
        snapshot_id=rec.snapshot_id or "",
        backbone=rec.backbone,
        status=rec.status,
        format_hash=rec.format_hash,
        reward_mean=rec.reward_mean,
        reward_std=rec.reward_std,
        ensemble_size=rec.ensemble_size,
        loaded=loaded,
        metrics={k: float(v) for k, v in rec.metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)},
    )
    if rec.created_at_ms:
        info.created_at.FromMilliseconds(int(rec.created_at_ms))
    if served is not None:
        info.backend, info.precision = backend_and_precision(served)
        info.weight_bytes, info.device = served.weight_bytes, served.device
    return info


def backend_and_precision(served) -> tuple[str, str]:
    """("torch", its precision) or ("onnxruntime", "fp32")."""
    if served.backend is served.runtime:
        return "torch", served.runtime.precision
    return "onnxruntime", "fp32"


def candidate(pb: preference_pb2.Candidate):
    from rm_service.store.tasks import Candidate

    return Candidate(
        prompt=messages(pb.prompt),
        completions=list(pb.completions),
        policy_version=pb.policy_version,
        sampling=dict(pb.sampling),
        priority=pb.priority,
    )


def session_candidate(pb: preference_pb2.SessionCandidate):
    from rm_service.store.session_tasks import SessionCandidate

    return SessionCandidate(
        conversation=messages(pb.conversation),
        policy_version=pb.policy_version,
        sampling=dict(pb.sampling),
        priority=pb.priority,
    )


TASK_KINDS = {"ranking": preference_pb2.RANKING, "session": preference_pb2.SESSION}


def task_kinds(kinds) -> tuple[str, ...]:
    """LeaseTasksRequest.kinds as store kinds; empty: ranking only."""
    from rm_service.errors import InvalidArgument

    names = {v: k for k, v in TASK_KINDS.items()}
    out = []
    for i, k in enumerate(kinds):
        if k not in names:
            raise InvalidArgument(f"kinds[{i}]", f"must be RANKING or SESSION, got {preference_pb2.TaskKind.Name(k)}")
        out.append(names[k])
    return tuple(dict.fromkeys(out)) or ("ranking",)


def task(t) -> preference_pb2.Task:
    session = t.kind == "session"
    return preference_pb2.Task(
        task_id=t.task_id,
        prompt=[] if session else to_proto(t.prompt),
        completions=t.completions,
        policy_version=t.policy_version,
        lease_expires_unix_ms=t.lease_expires_unix_ms,
        kind=TASK_KINDS[t.kind],
        conversation=to_proto(t.prompt) if session else [],
    )
