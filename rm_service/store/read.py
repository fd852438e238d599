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
