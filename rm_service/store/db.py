"""Store: the one process-wide owner of the DuckDB file.

DuckDB allows one writing process per file; this class is that writer. Every write runs in
one transaction and a label counts as stored only after its COMMIT returns. A second process
that opens a file in use gets `Unavailable` with a hint to go through the server instead.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import duckdb

from rm_service.conversation import Message, messages_from_json
from rm_service.errors import InvalidArgument, NotFound, Unavailable
from rm_service.settings import StoreSettings
from rm_service.store.agreement import LabelSet, annotators, feedback_agreement
from rm_service.store.agreement import report as agreement_report
from rm_service.store.feedback import FeedbackIn, PreparedFeedback, prepare_feedback
from rm_service.store.labels import IngestOutcome, LabelIn, PairPolicy, PreparedLabel, expand_pairs, prepare_label
from rm_service.store.rows import Rows
from rm_service.store.schema import TASK_AVAILABLE, migrate
from rm_service.store.tx import one_row, transaction

# A label as Store.prepare leaves it: validated, or already decided (REJECTED).
Prepared = PreparedLabel | PreparedFeedback | IngestOutcome


@dataclass(frozen=True)
class Pair:
    """One Bradley-Terry comparison expanded from a label: chosen over rejected."""

    label_id: str
    conversation_id: str
    prompt: list[Message]
    chosen_id: str
    chosen: str
    rejected_id: str
    rejected: str
    strength: float | None
    source: str
    origin: str = ""  # where the completions came from (dataset | policy@<version> | human); "a|b" when they differ
    seq: int = 0  # the label's commit sequence number (snapshots hold labels up to a seq)

    @property
    def on_policy(self) -> bool:
        """Both completions were sampled from a policy (labels of its fresh samples)."""
        return all(part.startswith("policy@") for part in self.origin.split("|"))


@dataclass(frozen=True)
class Snapshot:
    snapshot_id: str
    max_seq: int
    num_labels: int


class Store:
    def __init__(self, settings: StoreSettings | None = None, read_only: bool = False):
        self.settings = settings or StoreSettings()
        path = Path(self.settings.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.con = duckdb.connect(str(path), read_only=read_only)
        except duckdb.IOException as exc:
            raise Unavailable(
                f"cannot open the store {path}: {exc}. Another process (a running `rm-service serve`?) "
                "owns it; send labels through the server's IngestLabels instead"
            ) from exc
        self._lock = threading.RLock()  # one writer: DuckDB connections are not thread-safe
        if not read_only:
            try:
                migrate(self.con)
            except Exception:
                self.con.close()
                raise

    def close(self) -> None:
        with self._lock:
            self.con.close()

    @contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """The writer lock and one transaction: COMMIT at the end of the block, ROLLBACK on error."""
        with self._lock, transaction(self.con) as con:
            yield con

    def checkpoint(self) -> None:
        with self._lock:
            self.con.execute("CHECKPOINT")

    # -- ingestion -------------------------------------------------------------------------

    def ingest(
        self, labels: Sequence[LabelIn | FeedbackIn | IngestOutcome], origin: str = "dataset", field: str = "labels"
    ) -> list[IngestOutcome]:
        """Validate and store labels in one transaction; one outcome per label, in order."""
        return self.ingest_batches([self.prepare(labels, origin, field)])[0]

    def prepare(
        self, labels: Sequence[LabelIn | FeedbackIn | IngestOutcome], origin: str = "dataset", field: str = "labels"
    ) -> list[Prepared]:
        """Validate each label (store.labels.prepare_label, or store.feedback.prepare_feedback
        for thumbs and outcomes, with this store's limits) before
        it joins a transaction: a bad one becomes its REJECTED outcome, naming `field[i].<name>`.
        An outcome in `labels` (an item its transport could not read) passes through, in its place.
        `origin` is the provenance of completions not yet stored. Needs no lock: callers run
        it in their own thread, so a large request does not hold up other requests' commits."""
        s = self.settings
        out: list[Prepared] = []
        for i, label in enumerate(labels):
            try:
                if isinstance(label, IngestOutcome):
                    out.append(label)
                elif isinstance(label, FeedbackIn):
                    out.append(prepare_feedback(label, f"{field}[{i}]", s.max_text_chars))
                else:
                    out.append(
                        prepare_label(label, f"{field}[{i}]", origin, s.max_text_chars, s.max_responses, s.max_strength)
                    )
            except InvalidArgument as exc:
                out.append(IngestOutcome(label.label_id, "REJECTED", str(exc)))
        return out

    def ingest_batches(self, batches: list[list[Prepared]]) -> list[list[IngestOutcome]]:
        """Store several requests' prepared labels (Store.prepare) in ONE transaction (group commit).

        Outcomes already decided (REJECTED by validation) pass through. A label_id already
        stored, or earlier in this call, with the same payload is a DUPLICATE; with another
        payload a CONFLICT; neither writes anything. A label answering an unknown task is
        REJECTED. Outcomes are returned only after COMMIT: an INSERTED label is durable.
        """
        outcomes = [[item if isinstance(item, IngestOutcome) else None for item in batch] for batch in batches]
        valid = [
            (b, i, item)
            for b, batch in enumerate(batches)
            for i, item in enumerate(batch)
            if not isinstance(item, IngestOutcome)
        ]
        with self.transaction():
            known = self._stored_hashes([p.label.label_id for _, _, p in valid])
            tasks = self._open_tasks([p.label.task_id for _, _, p in valid if p.label.task_id])
            rows = Rows()
            for b, i, prepared in valid:
                label, phash = prepared.label, prepared.payload_hash
                if label.label_id in known:
                    same = known[label.label_id] == phash
                    outcomes[b][i] = IngestOutcome(
                        label.label_id,
                        "DUPLICATE" if same else "CONFLICT",
                        "" if same else "label_id already stored with a different payload",
                    )
                    continue
                mismatch = _task_mismatch(prepared, tasks)
                if mismatch:
                    outcomes[b][i] = IngestOutcome(label.label_id, "REJECTED", mismatch)
                    continue
                known[label.label_id] = phash
                rows.add(prepared)
                outcomes[b][i] = IngestOutcome(label.label_id, "INSERTED")
            rows.write(self.con)
        return cast(list[list[IngestOutcome]], outcomes)  # every None was decided above

    def _open_tasks(self, task_ids: list[str]) -> dict[str, tuple[str, str]]:
        """{task id: (kind, conversation id)} of the tasks named."""
        if not task_ids:
            return {}
        rows = self.con.execute(
            "SELECT task_id, kind, conversation_id FROM tasks WHERE task_id IN (SELECT unnest(?::VARCHAR[]))",
            [task_ids],
        ).fetchall()
        return {r[0]: (r[1], r[2]) for r in rows}

    def _stored_hashes(self, label_ids: list[str]) -> dict[str, str]:
        if not label_ids:
            return {}
        rows = self.con.execute(
            "SELECT label_id, payload_hash FROM labels WHERE label_id IN (SELECT unnest(?::VARCHAR[]))", [label_ids]
        ).fetchall()
        return dict(rows)

    # -- snapshots and pairs ---------------------------------------------------------------

    def create_snapshot(self) -> Snapshot:
        """Freeze the set of labels committed so far: a reproducible training input."""
        with self.transaction() as con:
            max_seq, count = one_row(con, "SELECT coalesce(max(seq), 0), count(*) FROM labels")
            number = one_row(con, "SELECT count(*) FROM snapshots")[0] + 1
            snap = Snapshot(f"snap-{number:06d}", int(max_seq), int(count))
            con.execute(
                "INSERT INTO snapshots (snapshot_id, max_seq, num_labels) VALUES (?, ?, ?)",
                [snap.snapshot_id, snap.max_seq, snap.num_labels],
            )
        return snap

    def get_snapshot(self, snapshot_id: str | None = None) -> Snapshot | None:
        """A snapshot by id, or the latest one (None if there is none)."""
        with self._lock:
            if snapshot_id:
                row = self.con.execute(
                    "SELECT snapshot_id, max_seq, num_labels FROM snapshots WHERE snapshot_id = ?", [snapshot_id]
                ).fetchone()
                if row is None:
                    raise NotFound(f"snapshot {snapshot_id!r} not found")
            else:
                row = self.con.execute(
                    "SELECT snapshot_id, max_seq, num_labels FROM snapshots ORDER BY max_seq DESC, snapshot_id DESC "
                    "LIMIT 1"
                ).fetchone()
        return Snapshot(*row) if row else None

    def pairs(self, snapshot: Snapshot, policy: PairPolicy = "all") -> list[Pair]:
        """Bradley-Terry pairs of every label in the snapshot, in label commit order."""
        with self._lock:
            rows = self.con.execute(
                """
                SELECT l.label_id, l.conversation_id, c.messages, l.strength, l.source,
                       list(r.completion_id ORDER BY r.position), list(r.rank ORDER BY r.position),
                       list(k.text ORDER BY r.position), list(k.origin ORDER BY r.position), min(l.seq)
                FROM labels l
                JOIN conversations c ON c.id = l.conversation_id
                JOIN label_rankings r ON r.label_id = l.label_id
                JOIN completions k ON k.id = r.completion_id
                WHERE l.seq <= ?
                GROUP BY ALL
                ORDER BY min(l.seq)
                """,
                [snapshot.max_seq],
            ).fetchall()
        out = []
        for label_id, conv_id, messages, strength, source, comp_ids, ranks, texts, origins, seq in rows:
            prompt = messages_from_json(messages)
            for i, j in expand_pairs(ranks, policy):
                origin = origins[i] if origins[i] == origins[j] else f"{origins[i]}|{origins[j]}"
                out.append(
                    Pair(
                        label_id,
                        conv_id,
                        prompt,
                        comp_ids[i],
                        texts[i],
                        comp_ids[j],
                        texts[j],
                        strength,
                        source,
                        origin,
                        seq,
                    )
                )
        return out

    # -- stats -----------------------------------------------------------------------------

    def stats(self, since_snapshot_id: str | None = None) -> dict:
        with self._lock:
            q = self.con.execute
            by_source = dict(q("SELECT source, count(*) FROM labels GROUP BY source").fetchall())
            snap = self.get_snapshot(since_snapshot_id)
            since = one_row(self.con, "SELECT count(*) FROM labels WHERE seq > ?", [snap.max_seq if snap else 0])[0]
            queued = one_row(self.con, f"SELECT count(*) FROM tasks WHERE {TASK_AVAILABLE}")[0]
            leased = one_row(
                self.con, "SELECT count(*) FROM tasks WHERE state = 'leased' AND lease_expires_at >= now()"
            )[0]
            done = one_row(self.con, "SELECT count(*) FROM tasks WHERE state = 'done'")[0]
            judge = self.judge_agreement()
            fb = feedback_agreement(self.con)
            session_queued = one_row(
                self.con, f"SELECT count(*) FROM tasks WHERE {TASK_AVAILABLE} AND kind = 'session'"
            )
            pairs = one_row(
                self.con,
                """SELECT coalesce(sum(n), 0) FROM (SELECT a.label_id, count(*) AS n FROM label_rankings a
                         JOIN label_rankings b ON a.label_id = b.label_id AND a.rank < b.rank
                         GROUP BY a.label_id)""",
            )[0]
            feedback = one_row(
                self.con,
                """SELECT count(DISTINCT label_id), count(*) FILTER (kind = 'thumb'),
                                   count(*) FILTER (kind = 'outcome')
                            FROM label_feedback""",
            )
            return {
                "feedback_labels": feedback[0],
                "thumbs": feedback[1],
                "outcomes": feedback[2],
                "labels_total": sum(by_source.values()),
                "labels_by_source": by_source,
                "conversations": one_row(self.con, "SELECT count(*) FROM conversations")[0],
                "completions": one_row(self.con, "SELECT count(*) FROM completions")[0],
                "pairs": int(pairs),
                "latest_snapshot_id": snap.snapshot_id if snap else "",
                "labels_since_snapshot": since,
                "queue_depth": queued,
                "tasks_leased": leased,
                "tasks_done": done,
                "judge_human_shared_pairs": judge.shared_pairs,
                "judge_human_agreement": _finite(judge.agreement),
                "judge_human_kappa": _finite(judge.kappa),
                "judge_swapped_pairs": judge.swapped_pairs,
                "judge_position_bias_rate": judge.position_bias_rate,
                "judge_longer_preferred": _finite(judge.judge_longer),
                "human_longer_preferred": _finite(judge.reference_longer),
                "judge_human_shared_thumbs": fb.shared_thumbs,
                "judge_human_thumb_agreement": _finite(fb.thumb_agreement),
                "judge_human_thumb_kappa": _finite(fb.thumb_kappa),
                "judge_human_shared_outcomes": fb.shared_outcomes,
                "judge_human_outcome_agreement": _finite(fb.outcome_agreement),
                "session_queue_depth": session_queued[0],
            }

    def judge_agreement(self, reference: tuple[str, ...] = ("HUMAN",), judge: str | None = None):
        """Judge labels (of one judge, or of all) against the reference sources' labels
        (store.agreement)."""
        if "JUDGE" in reference or not reference:
            raise InvalidArgument(
                "reference", f"must name non-judge sources (HUMAN, IMPORT), got {', '.join(reference) or 'none'}"
            )
        return self.agreement(LabelSet(tuple(reference)), LabelSet(("JUDGE",), judge))

    def agreement(self, reference: LabelSet, other: LabelSet):
        """`other`'s labels against `reference`'s on the pairs both ranked (store.agreement):
        people against a judge, or one person against another."""
        with self._lock:
            return agreement_report(self.con, reference, other)

    def annotators(self, source: str) -> list[tuple[str, int]]:
        """(annotator, labels) of one source, most labels first."""
        with self._lock:
            return annotators(self.con, source)


def _task_mismatch(prepared: PreparedLabel | PreparedFeedback, tasks: dict[str, tuple[str, str]]) -> str:
    """Why a label may not answer the task it names ("" when it may, or names none): an unknown
    task; a ranking for a session task; feedback on a session task about another conversation."""
    task_id = prepared.label.task_id
    if not task_id:
        return ""
    if task_id not in tasks:
        return f"{prepared.field}.task_id: unknown task {task_id!r}"
    kind, conv = tasks[task_id]
    feedback = isinstance(prepared, PreparedFeedback)
    if kind == "session" and not feedback:
        return f"{prepared.field}.task_id: task {task_id!r} is a session task; answer it with feedback (IngestFeedback)"
    if kind == "session" and prepared.conversation_id != conv:
        return f"{prepared.field}.conversation: is not the conversation of session task {task_id!r}"
    return ""


def _finite(value: float) -> float:
    """0.0 for an undefined (NaN) statistic: protobuf and JSON readers expect numbers."""
    return value if value == value else 0.0
