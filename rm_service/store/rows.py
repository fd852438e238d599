"""Column buffers for one ingestion transaction: labels, rankings and feedback become one
INSERT per table (DuckDB's fast path), written inside the caller's transaction."""

from __future__ import annotations

import duckdb

from rm_service.store.feedback import PreparedFeedback
from rm_service.store.labels import PreparedLabel

# A table's rows column by column (DuckDB takes each column as one list parameter).
Columns = dict[str, list]


class Rows:
    """Column buffers for one ingestion transaction, written with one INSERT per table."""

    def __init__(self) -> None:
        self.conversations: Columns = {"id": [], "messages": [], "num_turns": []}
        self.completions: Columns = {"id": [], "conversation_id": [], "text": [], "origin": []}
        self.labels: Columns = {
            k: []
            for k in (
                "label_id",
                "conversation_id",
                "source",
                "annotator",
                "strength",
                "rationale",
                "metadata",
                "task_id",
                "payload_hash",
            )
        }
        self.rankings: Columns = {"label_id": [], "position": [], "completion_id": [], "rank": []}
        self.feedback: Columns = {"label_id": [], "kind": [], "message_index": [], "value": []}
        self._seen_conv: set[str] = set()
        self._seen_comp: set[str] = set()
        self._feedback_ids: set[str] = set()

    def add(self, p: PreparedLabel | PreparedFeedback) -> None:
        label, conv = p.label, p.conversation_id
        if conv not in self._seen_conv:
            self._seen_conv.add(conv)
            turns = len(p.label.conversation) if isinstance(p, PreparedFeedback) else len(p.label.prompt)
            _append(self.conversations, id=conv, messages=p.messages_json, num_turns=turns)
        if isinstance(p, PreparedFeedback):  # thumbs and an outcome: no completions, no ranking
            for kind, index, value in p.rows():
                _append(self.feedback, label_id=label.label_id, kind=kind, message_index=index, value=value)
            self._feedback_ids.add(label.label_id)
        else:
            self._add_ranking(p)
        _append(
            self.labels,
            label_id=label.label_id,
            conversation_id=conv,
            source=label.source,
            annotator=label.annotator,
            strength=None if isinstance(p, PreparedFeedback) else p.label.strength,
            rationale=label.rationale,
            metadata=p.metadata_json,
            task_id=label.task_id or None,
            payload_hash=p.payload_hash,
        )

    def _add_ranking(self, p: PreparedLabel) -> None:
        label, conv = p.label, p.conversation_id
        for position, (text, rank, comp) in enumerate(zip(label.responses, label.ranks, p.completion_ids, strict=True)):
            if comp not in self._seen_comp:  # a completion already stored keeps its origin (e.g. policy@<version>)
                self._seen_comp.add(comp)
                _append(self.completions, id=comp, conversation_id=conv, text=text, origin=p.origin)
            _append(self.rankings, label_id=label.label_id, position=position, completion_id=comp, rank=rank)

    def write(self, con: duckdb.DuckDBPyConnection) -> None:
        if not self.labels["label_id"]:
            return
        c = self.conversations
        con.execute(
            """INSERT INTO conversations (id, messages, num_turns)
                       SELECT * FROM (SELECT unnest(?::VARCHAR[]) AS id, unnest(?::VARCHAR[])::JSON,
                                             unnest(?::INTEGER[]))
                       WHERE id NOT IN (SELECT id FROM conversations)""",
            [c["id"], c["messages"], c["num_turns"]],
        )
        k = self.completions
        con.execute(
            """INSERT INTO completions (id, conversation_id, text, origin)
                       SELECT * FROM (SELECT unnest(?::VARCHAR[]) AS id, unnest(?::VARCHAR[]), unnest(?::VARCHAR[]),
                                             unnest(?::VARCHAR[]))
                       WHERE id NOT IN (SELECT id FROM completions)""",
            [k["id"], k["conversation_id"], k["text"], k["origin"]],
        )
        lab = self.labels
        con.execute(
            """INSERT INTO labels (label_id, seq, conversation_id, source, annotator, strength, rationale, metadata,
                                  task_id, payload_hash)
                       SELECT l, nextval('label_seq'), c, s, a, st, r, m::JSON, t, h FROM (
                         SELECT unnest(?::VARCHAR[]) AS l, unnest(?::VARCHAR[]) AS c, unnest(?::VARCHAR[]) AS s,
                                unnest(?::VARCHAR[]) AS a, unnest(?::DOUBLE[]) AS st, unnest(?::VARCHAR[]) AS r,
                                unnest(?::VARCHAR[]) AS m, unnest(?::VARCHAR[]) AS t, unnest(?::VARCHAR[]) AS h,
                                generate_subscripts(?::VARCHAR[], 1) AS i) ORDER BY i""",
            [
                lab["label_id"],
                lab["conversation_id"],
                lab["source"],
                lab["annotator"],
                lab["strength"],
                lab["rationale"],
                lab["metadata"],
                lab["task_id"],
                lab["payload_hash"],
                lab["label_id"],
            ],
        )
        r = self.rankings
        con.execute(
            """INSERT INTO label_rankings (label_id, position, completion_id, rank)
                       SELECT unnest(?::VARCHAR[]), unnest(?::INTEGER[]), unnest(?::VARCHAR[]), unnest(?::INTEGER[])""",
            [r["label_id"], r["position"], r["completion_id"], r["rank"]],
        )
        f = self.feedback
        if f["label_id"]:
            con.execute(
                """INSERT INTO label_feedback (label_id, kind, message_index, value)
                           SELECT unnest(?::VARCHAR[]), unnest(?::VARCHAR[]), unnest(?::INTEGER[]),
                                  unnest(?::DOUBLE[])""",
                [f["label_id"], f["kind"], f["message_index"], f["value"]],
            )
        closes = [
            (task_id, label_id) for task_id, label_id in zip(lab["task_id"], lab["label_id"], strict=True) if task_id
        ]
        if closes:
            # A ranking answering a task closes it; feedback closes only a session task (feedback on a
            # ranking task's chat is provenance only). Ingestion checked each label fits its task's kind.
            con.execute(
                """UPDATE tasks SET state = 'done', lease_owner = NULL, lease_expires_at = NULL, closed_by = c.label_id
                           FROM (SELECT unnest(?::VARCHAR[]) AS task_id, unnest(?::VARCHAR[]) AS label_id,
                                        unnest(?::BOOLEAN[]) AS feedback) c
                           WHERE tasks.task_id = c.task_id AND tasks.state <> 'done'
                             AND (NOT c.feedback OR tasks.kind = 'session')""",
                [
                    [task_id for task_id, _ in closes],
                    [label_id for _, label_id in closes],
                    [label_id in self._feedback_ids for _, label_id in closes],
                ],
            )


def _append(columns: dict[str, list], **values) -> None:
    for key, value in values.items():
        columns[key].append(value)
