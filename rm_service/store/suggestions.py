"""Suggestions shown beside a labeling task, kept apart from labels.

A person labeling a task sees what the served reward model scores each completion and, when a
judge already ranked the same completions, the judge's ranking. Each suggestion shown is
recorded in `suggestions` (task, kind, where it came from, ranks over the task's completions,
the model's scores) so that what a person saw stays known; it is never a label and never
counts as anyone's answer. The person's label names the suggestions shown in its metadata.
"""

from __future__ import annotations

from dataclasses import dataclass

from rm_service.store.db import Store


@dataclass(frozen=True)
class Suggestion:
    kind: str  # model | judge
    origin: str  # the model version, or the judge label's id
    suggester: str  # the model version, or the judge's annotator id
    ranks: list[int]  # per task completion, 0 = best, ties equal
    scores: list[float] | None = None  # the model's rewards per completion

    def as_dict(self) -> dict:
        return {
            "kind": self.kind,
            "origin": self.origin,
            "suggester": self.suggester,
            "ranks": self.ranks,
            "scores": self.scores,
        }


def ranks_from_scores(scores: list[float]) -> list[int]:
    """Dense ranks of scores, highest first: [0.3, 0.9, 0.3] -> [1, 0, 1]."""
    order = sorted(set(scores), reverse=True)
    return [order.index(s) for s in scores]


def judge_suggestions(store: Store, completion_ids: list[str]) -> list[Suggestion]:
    """JUDGE labels that ranked exactly these completions (any order), newest first, with
    their ranks in the given completions' order."""
    with store.transaction() as con:
        rows = con.execute(
            """SELECT l.label_id, l.annotator, map(list(r.completion_id), list(r.rank))
               FROM labels l JOIN label_rankings r ON r.label_id = l.label_id
               WHERE l.source = 'JUDGE'
                 AND l.conversation_id = (SELECT conversation_id FROM completions WHERE id = $first)
               GROUP BY l.label_id, l.annotator, l.seq
               HAVING list_sort(list(r.completion_id)) = list_sort($ids::VARCHAR[])
               ORDER BY l.seq DESC""",
            {"first": completion_ids[0], "ids": completion_ids},
        ).fetchall()
    return [
        Suggestion("judge", label_id, annotator, [ranks[c] for c in completion_ids])
        for label_id, annotator, ranks in rows
    ]


def record(store: Store, task_id: str, suggestions: list[Suggestion]) -> None:
    """Keep the suggestions shown for a task (the first record of each one stays)."""
    if not suggestions:
        return
    with store.transaction() as con:
        con.executemany(
            """INSERT INTO suggestions (task_id, kind, origin, suggester, ranks, scores) VALUES (?, ?, ?, ?, ?, ?)
               ON CONFLICT DO NOTHING""",
            [[task_id, s.kind, s.origin, s.suggester, s.ranks, s.scores] for s in suggestions],
        )


def shown(store: Store, task_id: str) -> list[Suggestion]:
    """The suggestions recorded for a task, oldest first."""
    with store.transaction() as con:
        rows = con.execute(
            "SELECT kind, origin, suggester, ranks, scores FROM suggestions WHERE task_id = ? ORDER BY created_at, "
            "kind, origin",
            [task_id],
        ).fetchall()
    return [
        Suggestion(kind, origin, suggester, list(ranks), list(scores) if scores is not None else None)
        for kind, origin, suggester, ranks, scores in rows
    ]
