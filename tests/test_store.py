"""The DuckDB store: idempotent ingestion, per-item statuses naming the field, pairs, snapshots."""

from __future__ import annotations

import math

import pytest

from rm_service.conversation import Message
from rm_service.settings import StoreSettings
from rm_service.store.db import Store
from rm_service.store.labels import LabelIn, expand_pairs
from rm_service.store.schema import MIGRATIONS, SCHEMA_VERSION

PROMPT = [Message("user", "Is the sky blue?")]


def _label(label_id="l1", responses=("Yes.", "No."), ranks=(0, 1), **kw) -> LabelIn:
    base = dict(source="HUMAN", annotator="bob")
    base.update(kw)
    return LabelIn(
        label_id,
        kw.pop("prompt", PROMPT) if "prompt" in kw else PROMPT,
        list(responses),
        list(ranks),
        **{k: v for k, v in base.items() if k != "prompt"},
    )


@pytest.fixture
def store(tmp_path):
    s = Store(StoreSettings(path=tmp_path / "rm.duckdb", max_text_chars=100))
    yield s
    s.close()


def _count(store, table):
    return store.con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


@pytest.mark.parametrize(
    ("label", "field"),
    [
        (_label(label_id=""), "labels[0].label_id"),
        (_label(responses=("Only one",), ranks=(0,)), "labels[0].responses"),
        (_label(responses=("Same", "Same")), "labels[0].responses"),
        (_label(ranks=(0, 2)), "labels[0].ranks[1]"),
        (_label(responses=("A", "B", "C"), ranks=(0, 2, 2)), "labels[0].ranks"),  # rank 1 unused: not dense
        (_label(ranks=(0, 4294967295)), "labels[0].ranks[1]"),
        (_label(ranks=(2**70, 0)), "labels[0].ranks[0]"),
        (_label(ranks=(0, -1)), "labels[0].ranks[1]"),
        (_label(ranks=(0, True)), "labels[0].ranks[1]"),
        (_label(responses=tuple(f"r{i}" for i in range(17)), ranks=tuple(range(17))), "labels[0].responses"),
        (_label(strength=math.inf), "labels[0].strength"),
        (_label(strength=1e300), "labels[0].strength"),
        (_label(strength=10**400), "labels[0].strength"),
        (_label(label_id="x" * 201), "labels[0].label_id"),
        (_label(annotator="a" * 201), "labels[0].annotator"),
        (_label(rationale="r" * 101), "labels[0].rationale"),
        (_label(responses=("ok \ud800", "no")), "labels[0].responses[0]"),
        (_label(prompt=[Message("user", "\udfff")]), "labels[0].prompt[0].content"),
        (_label(metadata={f"k{i}": "v" for i in range(65)}), "labels[0].metadata"),
        (_label(metadata={"k": "v" * 101}), "labels[0].metadata['k']"),
        (_label(ranks=(0,)), "labels[0].ranks"),
        (_label(strength=math.nan), "labels[0].strength"),
        (_label(strength=-1.0), "labels[0].strength"),
        (_label(source="ROBOT"), "labels[0].source"),
        (_label(annotator=""), "labels[0].annotator"),
        (_label(prompt=[Message("wizard", "hi")]), "labels[0].prompt[0].role"),
        (_label(responses=("x" * 101, "y")), "labels[0].responses[0]"),
        (_label(responses=("ok", "")), "labels[0].responses[1]"),
    ],
)
def test_bad_labels_are_rejected_naming_the_field_and_write_nothing(store, label, field):
    [outcome] = store.ingest([label])
    assert outcome.status == "REJECTED"
    assert outcome.reason.startswith(field + ":")
    assert _count(store, "labels") == 0 and _count(store, "completions") == 0 and _count(store, "conversations") == 0


def test_rank_checks_cost_nothing_in_proportion_to_the_rank(store):
    """A rank of 4294967295 once built a list of that length (MemoryError, the whole group
    commit failed); now it is compared with K and rejected in microseconds."""
    import time

    start = time.perf_counter()
    outcomes = store.ingest([_label("big", ranks=(0, 4294967295)), _label("ok"), _label("huge", ranks=(2**40, 0))])
    assert time.perf_counter() - start < 1.0
    assert [o.status for o in outcomes] == ["REJECTED", "INSERTED", "REJECTED"]
    assert "ranks[1]: is 4294967295; a rank must be in [0, 2)" in outcomes[0].reason


def test_bad_item_does_not_block_the_others(store):
    outcomes = store.ingest([_label("a"), _label("b", ranks=(5, 5)), _label("c", responses=("Maybe.", "No."))])
    assert [o.status for o in outcomes] == ["INSERTED", "REJECTED", "INSERTED"]
    assert sorted(r[0] for r in store.con.execute("SELECT label_id FROM labels").fetchall()) == ["a", "c"]
    assert _count(store, "conversations") == 1 and _count(store, "completions") == 3  # "No." shared, stored once


def test_retry_is_duplicate_and_changed_payload_is_conflict(store):
    assert store.ingest([_label("a")])[0].status == "INSERTED"
    outcomes = store.ingest([_label("a"), _label("a", ranks=(1, 0)), _label("b"), _label("b")])
    assert [o.status for o in outcomes] == ["DUPLICATE", "CONFLICT", "INSERTED", "DUPLICATE"]
    assert _count(store, "labels") == 2
    ranks = store.con.execute("SELECT rank FROM label_rankings WHERE label_id = 'a' ORDER BY position").fetchall()
    assert ranks == [(0,), (1,)]  # the conflicting payload changed nothing


def test_provenance_is_stored(store):
    store.ingest(
        [
            _label(
                "a",
                source="JUDGE",
                annotator="judge-model-x",
                rationale="clearer",
                strength=2.0,
                metadata={"batch": "7"},
            )
        ]
    )
    row = store.con.execute("SELECT source, annotator, rationale, strength, metadata->>'batch' FROM labels").fetchone()
    assert row == ("JUDGE", "judge-model-x", "clearer", 2.0, "7")


def test_expand_pairs_ties_and_rankings():
    assert expand_pairs([0, 1]) == [(0, 1)]
    assert expand_pairs([1, 0]) == [(1, 0)]
    assert expand_pairs([0, 0]) == []  # a tie gives no pair
    assert sorted(expand_pairs([0, 1, 1])) == [(0, 1), (0, 2)]
    assert sorted(expand_pairs([1, 0, 2])) == [(0, 2), (1, 0), (1, 2)]
    assert sorted(expand_pairs([1, 0, 2], "best")) == [(1, 0), (1, 2)]


def test_snapshot_fixes_the_training_set(store):
    store.ingest([_label("a"), _label("k", responses=("A", "B", "C"), ranks=(2, 0, 1))])
    snap = store.create_snapshot()
    store.ingest([_label("late", responses=("Sure.", "Nope."))])
    pairs = store.pairs(snap)
    assert {p.label_id for p in pairs} == {"a", "k"} and len(pairs) == 1 + 3
    assert {(p.chosen, p.rejected) for p in pairs if p.label_id == "k"} == {("B", "C"), ("B", "A"), ("C", "A")}
    stats = store.stats()
    assert (
        stats["labels_total"] == 3
        and stats["labels_since_snapshot"] == 1
        and stats["latest_snapshot_id"] == snap.snapshot_id
    )


def test_reopening_keeps_committed_labels(tmp_path):
    path = tmp_path / "rm.duckdb"
    s = Store(StoreSettings(path=path))
    s.ingest([_label("a")])
    s.close()
    s = Store(StoreSettings(path=path))
    try:
        assert s.con.execute("SELECT label_id FROM labels").fetchall() == [("a",)]
        assert s.con.execute("SELECT max(version) FROM schema_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        s.close()


def test_opening_an_older_file_upgrades_it(tmp_path):
    import duckdb

    path = tmp_path / "old.duckdb"
    con = duckdb.connect(str(path))  # a file written by schema v1, with a queued task
    con.execute(MIGRATIONS[0])
    con.execute(
        "CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ DEFAULT current_timestamp)"
    )
    con.execute("INSERT INTO schema_version (version) VALUES (1)")
    con.execute(
        "INSERT INTO tasks (task_id, conversation_id, completion_ids, state) VALUES ('t1', 'c1', ['a', 'b'], 'queued')"
    )
    con.close()
    s = Store(StoreSettings(path=path))
    try:
        assert [r[0] for r in s.con.execute("SELECT version FROM schema_version ORDER BY version").fetchall()] == list(
            range(1, SCHEMA_VERSION + 1)
        )
        assert s.con.execute("SELECT task_id, lease_count, closed_by FROM tasks").fetchall() == [("t1", 0, None)]
    finally:
        s.close()


def test_a_newer_file_is_refused(tmp_path):
    path = tmp_path / "new.duckdb"
    Store(StoreSettings(path=path)).close()
    import duckdb

    con = duckdb.connect(str(path))
    con.execute("INSERT INTO schema_version (version) VALUES (?)", [SCHEMA_VERSION + 1])
    con.close()
    from rm_service.errors import FailedPrecondition

    with pytest.raises(FailedPrecondition, match="newer than this rm-service"):
        Store(StoreSettings(path=path))
