"""Read whole labels back from the store, as of a snapshot; and every stored conversation.

`labels_in_snapshot` rebuilds every label with seq <= snapshot.max_seq exactly as it was
ingested (prompt, responses in position order, ranks with their ties, provenance), in commit
order. Labels are never updated or deleted, so the same snapshot always reads the same labels
while ingestion goes on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from rm_service.conversation import Message, messages_from_json
from rm_service.store.db import Snapshot, Store
from rm_service.store.labels import LabelIn

_QUERY = """
WITH ranked AS (
    SELECT r.label_id, list(k.text ORDER BY r.position) AS responses, list(r.rank ORDER BY r.position) AS ranks
    FROM label_rankings r
    JOIN completions k ON k.id = r.completion_id
    JOIN labels l ON l.label_id = r.label_id
    WHERE l.seq <= $max_seq
    GROUP BY r.label_id
)
SELECT l.seq, l.label_id, c.messages, ranked.responses, ranked.ranks, l.source, l.annotator, l.strength,
       l.rationale, l.metadata, l.task_id
FROM labels l
JOIN conversations c ON c.id = l.conversation_id
JOIN ranked ON ranked.label_id = l.label_id
WHERE l.seq <= $max_seq
ORDER BY l.seq
"""


@dataclass(frozen=True, kw_only=True)
class StoredLabel(LabelIn):
    """A label as stored: the LabelIn that was ingested, plus its commit order."""

    seq: int


def labels_in_snapshot(store: Store, snapshot: Snapshot) -> list[StoredLabel]:
    """Every label of the snapshot, in commit (seq) order, read with one query."""
    with store._lock:
        rows = store.con.execute(_QUERY, {"max_seq": snapshot.max_seq}).fetchall()
    return [_label(row) for row in rows]


_DIALOGUES = """
SELECT l.conversation_id, c.messages, arg_min(k.text, r.rank) AS best, arg_min(k.origin, r.rank) AS origin
FROM labels l
JOIN conversations c ON c.id = l.conversation_id
JOIN label_rankings r ON r.label_id = l.label_id
JOIN completions k ON k.id = r.completion_id
WHERE l.seq <= $max_seq
GROUP BY l.label_id, l.conversation_id, c.messages
ORDER BY min(l.seq)
"""


@dataclass(frozen=True)
class Dialogue:
    """A ranking label's conversation carried on by its best-ranked response (ties: any of them)."""

    conversation_id: str  # the prompt's id, what held-out splits go by
    messages: list[Message]  # prompt + the best response as the last, assistant, turn
    origin: str  # the best response's: dataset | policy@<version> | human


def dialogues(store: Store, snapshot: Snapshot) -> list[Dialogue]:
    """One Dialogue per ranking label of the snapshot, in commit order (one query)."""
    with store._lock:
        rows = store.con.execute(_DIALOGUES, {"max_seq": snapshot.max_seq}).fetchall()
    return [
        Dialogue(cid, [*messages_from_json(m), Message("assistant", best)], origin) for cid, m, best, origin in rows
    ]


def feedback_conversations(store: Store, snapshot: Snapshot) -> list[tuple[str, list[Message]]]:
    """(conversation id, messages) of each whole conversation a feedback label (thumbs, outcome)
    of the snapshot was given on, in commit order."""
    with store._lock:
        rows = store.con.execute(
            """SELECT l.conversation_id, any_value(c.messages)
               FROM labels l JOIN conversations c ON c.id = l.conversation_id
               WHERE l.seq <= ? AND l.label_id IN (SELECT label_id FROM label_feedback)
               GROUP BY l.conversation_id ORDER BY min(l.seq)""",
            [snapshot.max_seq],
        ).fetchall()
    return [(cid, messages_from_json(m)) for cid, m in rows]


def conversations(store: Store) -> list[list[Message]]:
    """Every stored conversation (a prompt), in id order."""
    with store._lock:
        rows = store.con.execute("SELECT messages FROM conversations ORDER BY id").fetchall()
    return [messages_from_json(r[0]) for r in rows]


def _label(row: tuple) -> StoredLabel:
    seq, label_id, messages, responses, ranks, source, annotator, strength, rationale, metadata, task_id = row
    return StoredLabel(
        seq=seq,
        label_id=label_id,
        prompt=messages_from_json(messages),
        responses=list(responses),
        ranks=list(ranks),
        source=source,
        annotator=annotator,
        strength=strength,
        rationale=rationale or "",
        metadata=json.loads(metadata) if metadata else {},
        task_id=task_id or "",
    )
