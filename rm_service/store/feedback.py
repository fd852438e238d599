"""Feedback beyond rankings: per-turn thumbs and a session outcome, on one whole conversation.

A feedback label (`FeedbackIn`) is a label like a ranking: it has a client-chosen `label_id`
(the idempotency key, in the same key space as rankings: a ranking and a feedback may not share
an id), provenance (source, annotator, rationale, metadata, task), a commit sequence number
(so snapshots hold it), and it goes through the same validation-then-group-commit path
(Store.prepare, GroupCommitWriter). What it labels:

- thumbs:  up or down on some assistant turns of the conversation, each named by its index in
           `conversation`. Only a turn the reward model scores may carry one: an assistant
           message after the first user message (`conversation.scored_turns`, what ScoreTurns
           scores). At most one thumb per turn.
- outcome: the whole session's result, a number in [0, 1]: 1 = success, 0 = failure, values
           between for graded outcomes (map a rating scale onto [0, 1]).

A label holds thumbs, an outcome, or both. Rows: `labels` (provenance, the conversation id
of the whole conversation) and `label_feedback` (kind thumb | outcome, message_index, value:
thumb 1 up / 0 down; an outcome at message_index -1). How training uses them:
docs/feedback.md and rm_service/train/feedback.py.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from rm_service.conversation import (
    Message,
    canonical_json,
    conversation_id,
    scored_turns,
    validate_finite,
    validate_turns,
)
from rm_service.errors import InvalidArgument
from rm_service.store.labels import _short_text, validate_provenance

OUTCOME_INDEX = -1  # label_feedback.message_index of a session outcome


@dataclass(frozen=True)
class TurnThumb:
    message_index: int  # index of an assistant message in the conversation
    up: bool


@dataclass(frozen=True)
class FeedbackIn:
    label_id: str
    conversation: list[Message]
    thumbs: list[TurnThumb] = field(default_factory=list)
    outcome: float | None = None
    source: str = "HUMAN"
    annotator: str = ""
    rationale: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    task_id: str = ""

    def payload_hash(self) -> str:
        """Hash of everything but label_id (a retry has the same hash, a conflict another);
        `kind` keeps a feedback from ever hashing like a ranking."""
        payload = {
            "kind": "feedback",
            "conversation": [m.as_dict() for m in self.conversation],
            "thumbs": [[t.message_index, t.up] for t in self.thumbs],
            "outcome": self.outcome,
            "source": self.source,
            "annotator": self.annotator,
            "rationale": self.rationale,
            "metadata": dict(sorted(self.metadata.items())),
            "task_id": self.task_id,
        }
        return hashlib.sha256(json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()).hexdigest()


def validate_feedback(fb: FeedbackIn, where: str, max_chars: int) -> None:
    """Raise InvalidArgument naming `where.<field>` for the first problem found. Costs time in
    proportion to the label's size, never to a value in it (an index of 2**64 costs what 1 does)."""
    _short_text(fb.label_id, f"{where}.label_id", "is required (a client-chosen unique id)")
    validate_turns(fb.conversation, f"{where}.conversation", max_chars)
    scored = set(scored_turns(fb.conversation))
    if not fb.thumbs and fb.outcome is None:
        raise InvalidArgument(where, "holds neither thumbs nor an outcome; give at least one")
    if len(fb.thumbs) > len(fb.conversation):
        raise InvalidArgument(
            f"{where}.thumbs", f"has {len(fb.thumbs)} thumbs for {len(fb.conversation)} messages; one per turn at most"
        )
    seen: set[int] = set()
    for i, thumb in enumerate(fb.thumbs):
        name = f"{where}.thumbs[{i}]"
        index = thumb.message_index
        if isinstance(index, bool) or not isinstance(index, int):
            raise InvalidArgument(f"{name}.message_index", f"must be an integer, got {type(index).__name__}")
        if not 0 <= index < len(fb.conversation):
            shown = index if -(10**20) < index < 10**20 else f"an integer of {index.bit_length()} bits"
            raise InvalidArgument(
                f"{name}.message_index",
                f"is {shown}; out of range for a conversation of {len(fb.conversation)} messages",
            )
        if fb.conversation[index].role != "assistant":
            raise InvalidArgument(
                f"{name}.message_index",
                f"is {index}, a {fb.conversation[index].role} turn; thumbs go on assistant turns",
            )
        if index not in scored:
            raise InvalidArgument(
                f"{name}.message_index", f"is {index}, an assistant turn before any user turn; it answers nothing"
            )
        if index in seen:
            raise InvalidArgument(f"{name}.message_index", f"turn {index} already has a thumb in this label")
        seen.add(index)
        if not isinstance(thumb.up, bool):
            raise InvalidArgument(f"{name}.up", f"must be true (up) or false (down), got {type(thumb.up).__name__}")
    if fb.outcome is not None:
        validate_finite(fb.outcome, f"{where}.outcome", minimum=0.0, maximum=1.0)
        if not scored:
            raise InvalidArgument(
                f"{where}.conversation",
                "has no assistant turn after a user turn; an outcome needs one to be the value of",
            )
    validate_provenance(fb, where, max_chars)


@dataclass(frozen=True)
class PreparedFeedback:
    """A validated feedback label with what its rows need (the shape Store.ingest_batches takes)."""

    label: FeedbackIn
    field: str
    payload_hash: str
    conversation_id: str
    messages_json: str
    metadata_json: str

    def rows(self) -> list[tuple[str, int, float]]:
        """(kind, message_index, value) rows of label_feedback."""
        out = [("thumb", t.message_index, 1.0 if t.up else 0.0) for t in self.label.thumbs]
        if self.label.outcome is not None:
            out.append(("outcome", OUTCOME_INDEX, float(self.label.outcome)))
        return out


def prepare_feedback(fb: FeedbackIn, where: str, max_chars: int) -> PreparedFeedback:
    validate_feedback(fb, where, max_chars)
    try:
        return PreparedFeedback(
            fb,
            where,
            fb.payload_hash(),
            conversation_id(fb.conversation),
            canonical_json(fb.conversation),
            json.dumps(fb.metadata, sort_keys=True),
        )
    except (TypeError, ValueError) as exc:  # validation should have caught it; still, this label alone fails
        raise InvalidArgument(where, f"cannot be stored: {type(exc).__name__}: {exc}") from None


# -- reading back --------------------------------------------------------------------------

_QUERY = """
SELECT l.seq, l.label_id, c.messages, list(f.kind ORDER BY f.message_index),
       list(f.message_index ORDER BY f.message_index), list(f.value ORDER BY f.message_index), l.source,
       l.annotator, l.rationale, l.metadata, l.task_id
FROM labels l
JOIN conversations c ON c.id = l.conversation_id
JOIN label_feedback f ON f.label_id = l.label_id
WHERE l.seq <= $max_seq
GROUP BY ALL
ORDER BY l.seq
"""


@dataclass(frozen=True, kw_only=True)
class StoredFeedback(FeedbackIn):
    """A feedback label as stored: what was ingested (thumbs in turn order), plus its commit order."""

    seq: int

    @property
    def conversation_id(self) -> str:
        return conversation_id(self.conversation)


def feedback_in_snapshot(store, snapshot) -> list[StoredFeedback]:
    """Every feedback label of the snapshot (seq <= its max_seq), in commit order, one query."""
    with store._lock:
        rows = store.con.execute(_QUERY, {"max_seq": snapshot.max_seq}).fetchall()
    out = []
    for seq, label_id, messages, kinds, indexes, values, source, annotator, rationale, metadata, task_id in rows:
        thumbs = [TurnThumb(int(i), v >= 0.5) for k, i, v in zip(kinds, indexes, values, strict=True) if k == "thumb"]
        outcome = next((float(v) for k, v in zip(kinds, values, strict=True) if k == "outcome"), None)
        out.append(
            StoredFeedback(
                seq=seq,
                label_id=label_id,
                conversation=[Message(d["role"], d["content"]) for d in json.loads(messages)],
                thumbs=thumbs,
                outcome=outcome,
                source=source,
                annotator=annotator,
                rationale=rationale or "",
                metadata=json.loads(metadata) if metadata else {},
                task_id=task_id or "",
            )
        )
    return out
