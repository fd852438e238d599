"""Import and export of TRL, K-way ranking and Parquet files on real DuckDB stores."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pytest

from rm_service.conversation import Message
from rm_service.data import HH_PAIRS as HH_FILE
from rm_service.errors import InvalidArgument, NotFound
from rm_service.formats import export_file, import_file
from rm_service.settings import StoreSettings
from rm_service.store.db import Store
from rm_service.store.labels import LabelIn
from rm_service.store.read import labels_in_snapshot


def msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def ranking(label_id: str, ranks: list[int], **extra) -> dict:
    """A canonical K-way ranking record (every key, in export order)."""
    record = {
        "label_id": label_id,
        "prompt": [
            msg("system", "Be brief."),
            msg("user", f"Question {label_id}?"),
            msg("assistant", "Which part?"),
            msg("user", "All of it."),
        ],
        "responses": [f"answer {label_id} #{i}" for i in range(len(ranks))],
        "ranks": ranks,
        "source": "HUMAN",
        "annotator": "alice",
        "strength": None,
        "rationale": "",
        "metadata": {},
        "task_id": "",
    }
    return record | extra


RANKINGS = [
    ranking("tie", [0, 0, 1]),
    ranking("k4", [2, 0, 1, 3], strength=1.5, rationale="second is clearest", metadata={"b": "2", "a": "1"}),
    ranking("k4-ties", [1, 0, 1, 0], source="JUDGE", annotator="judge@v3"),
    ranking("pair", [1, 0], source="IMPORT", annotator="ünïcode ✓"),
]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in records),
        encoding="utf-8",
    )
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def pair_tuples(store: Store) -> list[tuple]:
    pairs = store.pairs(store.create_snapshot())
    return [(tuple(p.prompt), p.chosen, p.rejected, p.strength) for p in pairs]


@pytest.fixture
def make_store(tmp_path):
    stores: list[Store] = []

    def make(name: str = "rm") -> Store:
        stores.append(Store(StoreSettings(path=tmp_path / f"{name}.duckdb")))
        return stores[-1]

    yield make
    for s in stores:
        s.close()


@pytest.fixture
def store(make_store) -> Store:
    return make_store()


# -- TRL -----------------------------------------------------------------------------------


def test_trl_explicit_and_implicit_prompt_import(store, tmp_path):
    prompt = [msg("user", "Hi"), msg("assistant", "Hello!"), msg("user", "Tell me a joke")]
    explicit = {
        "prompt": prompt,
        "chosen": [msg("assistant", "A pun.")],
        "rejected": [msg("assistant", "No.")],
        "label_id": "x1",
        "annotator": "bob",
        "source": "HUMAN",
        "margin": 2,
        "score_chosen": 9.0,
    }
    implicit = {
        "chosen": [*prompt, msg("assistant", "Knock knock.")],
        "rejected": [*prompt, msg("assistant", "Go away.")],
        "strength": 0.5,
    }
    counts, reasons = import_file(store, write_jsonl(tmp_path / "trl.jsonl", [explicit, implicit]), "trl")
    assert counts["INSERTED"] == 2 and reasons == []
    a, b = labels_in_snapshot(store, store.create_snapshot())
    expected_prompt = [Message(**m) for m in prompt]
    assert (a.label_id, a.prompt, a.responses, a.ranks, a.source, a.annotator, a.strength) == (
        "x1",
        expected_prompt,
        ["A pun.", "No."],
        [0, 1],
        "HUMAN",
        "bob",
        2.0,
    )
    assert b.label_id.startswith("trl-") and len(b.label_id) == 4 + 24
    assert (b.prompt, b.responses, b.source, b.annotator, b.strength, b.metadata) == (
        expected_prompt,
        ["Knock knock.", "Go away."],
        "IMPORT",
        "trl",
        0.5,
        {"format": "trl"},
    )


def test_trl_canonical_file_round_trips(store, tmp_path):
    records = [
        {"prompt": [msg("user", "q1")], "chosen": [msg("assistant", "good")], "rejected": [msg("assistant", "bad")]},
        {
            "prompt": [msg("system", "s"), msg("user", "q2"), msg("assistant", "a"), msg("user", "q3")],
            "chosen": [msg("assistant", "yes ✓")],
            "rejected": [msg("assistant", "no")],
            "margin": 0.25,
        },
    ]
    import_file(store, write_jsonl(tmp_path / "in.jsonl", records), "trl")
    n, _ = export_file(store, tmp_path / "out.jsonl", "trl")
    # margin on every line or none (TRL's RewardTrainer fails on a column that is sometimes
    # missing): the pair without a strength gets 0.0, the loss without a margin
    assert n == 2 and read_jsonl(tmp_path / "out.jsonl") == [records[0] | {"margin": 0.0}, records[1]]


def test_hh_to_trl_to_fresh_store_keeps_the_pairs(make_store, tmp_path):
    first = make_store("first")
    counts, _ = import_file(first, HH_FILE, "hh")
    assert counts["INSERTED"] > 1800
    n, _ = export_file(first, tmp_path / "hh.trl.jsonl", "trl")
    second = make_store("second")
    counts, reasons = import_file(second, tmp_path / "hh.trl.jsonl", "trl")
    assert counts["INSERTED"] == n and reasons == []
    assert pair_tuples(second) == pair_tuples(first)


def test_trl_export_expands_rankings_and_drops_ties(store, tmp_path):
    import_file(store, write_jsonl(tmp_path / "r.jsonl", [RANKINGS[0], ranking("all-tie", [0, 0])]), "ranking")
    n, _ = export_file(store, tmp_path / "out.jsonl", "trl")
    exported = read_jsonl(tmp_path / "out.jsonl")
    assert n == 2  # [0, 0, 1]: #0 > #2 and #1 > #2; [0, 0]: nothing
    assert [(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in exported] == [
        ("answer tie #0", "answer tie #2"),
        ("answer tie #1", "answer tie #2"),
    ]


# -- K-way ranking and Parquet -------------------------------------------------------------


def test_ranking_round_trip_is_exact_with_ties_and_k4(store, tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", RANKINGS)
    counts, reasons = import_file(store, source, "ranking")
    assert counts["INSERTED"] == len(RANKINGS) and reasons == []
    n, _ = export_file(store, tmp_path / "out.jsonl", "ranking")
    assert n == len(RANKINGS) and read_jsonl(tmp_path / "out.jsonl") == RANKINGS
    assert [label.seq for label in labels_in_snapshot(store, store.create_snapshot())] == [1, 2, 3, 4]


def test_task_ids_round_trip_where_the_task_exists(make_store, tmp_path):
    first = make_store("first")
    with first._lock:
        first.con.execute(
            "INSERT INTO tasks (task_id, conversation_id, completion_ids, state) VALUES ('task-7', 'c', ['a', 'b'], "
            "'queued')"
        )
    record = ranking("answer", [1, 0], task_id="task-7")
    counts, _ = import_file(first, write_jsonl(tmp_path / "in.jsonl", [record]), "ranking")
    assert counts["INSERTED"] == 1
    export_file(first, tmp_path / "out.jsonl", "ranking")
    assert read_jsonl(tmp_path / "out.jsonl") == [record]
    counts, reasons = import_file(make_store("second"), tmp_path / "out.jsonl", "ranking")
    assert counts["REJECTED"] == 1 and reasons == ["line 1: answer: task_id: unknown task 'task-7'"]


def test_ranking_defaults_and_hash_ids(store, tmp_path):
    minimal = {"prompt": [msg("user", "q")], "responses": ["a", "b", "c"], "ranks": [0, 1, 1], "rationale": None}
    import_file(store, write_jsonl(tmp_path / "in.jsonl", [minimal]), "ranking", annotator="carol")
    (label,) = labels_in_snapshot(store, store.create_snapshot())
    assert label.label_id.startswith("ranking-")
    assert (label.source, label.annotator, label.strength, label.rationale, label.metadata, label.task_id) == (
        "IMPORT",
        "carol",
        None,
        "",
        {},
        "",
    )


def test_parquet_round_trip_is_exact(make_store, tmp_path):
    first = make_store("first")
    import_file(first, write_jsonl(tmp_path / "in.jsonl", RANKINGS), "ranking")
    n, _ = export_file(first, tmp_path / "labels.parquet", "parquet")
    assert n == len(RANKINGS)
    described = duckdb.sql(f"DESCRIBE SELECT * FROM read_parquet('{tmp_path / 'labels.parquet'}')").fetchall()
    types = {row[0]: row[1] for row in described}
    assert list(types) == [
        "label_id",
        "prompt",
        "responses",
        "ranks",
        "source",
        "annotator",
        "strength",
        "rationale",
        "metadata",
        "task_id",
    ]
    assert types["prompt"] == 'STRUCT("role" VARCHAR, "content" VARCHAR)[]'
    assert types["metadata"] == "MAP(VARCHAR, VARCHAR)" and types["ranks"] == "INTEGER[]"
    second = make_store("second")
    counts, reasons = import_file(second, tmp_path / "labels.parquet", "parquet")
    assert counts["INSERTED"] == len(RANKINGS) and reasons == []
    export_file(second, tmp_path / "out.jsonl", "ranking")
    assert read_jsonl(tmp_path / "out.jsonl") == RANKINGS


def test_parquet_rows_without_ids_and_bad_rows(store, tmp_path):
    path = tmp_path / "other.parquet"
    duckdb.sql(f"""COPY (SELECT * FROM (VALUES
        ([{{'role': 'user', 'content': 'q'}}], ['x', 'y'], [1, 0]),
        ([{{'role': 'user', 'content': 'q'}}], ['x', 'y'], [0, 2])) t(prompt, responses, ranks))
        TO '{path}' (FORMAT parquet)""")
    counts, reasons = import_file(store, path, "parquet")
    assert (counts["INSERTED"], counts["REJECTED"]) == (1, 1)
    assert (
        len(reasons) == 1
        and reasons[0].startswith("row 2: parquet-")
        and "ranks[1]: is 2; a rank must be in [0, 2)" in reasons[0]
    )
    (label,) = labels_in_snapshot(store, store.create_snapshot())
    assert label.label_id.startswith("parquet-") and label.annotator == "parquet" and label.ranks == [1, 0]
    counts, _ = import_file(store, path, "parquet")
    assert counts["DUPLICATE"] == 1


# -- snapshots, errors, idempotency --------------------------------------------------------


@pytest.mark.parametrize("fmt", ["hh", "trl", "ranking", "parquet"])
def test_export_of_a_snapshot_id_is_reproducible(store, tmp_path, fmt):
    hh_prompt = [msg("user", "Hi"), msg("assistant", "Hello"), msg("user", "Help?")]  # HH has no system role
    import_file(store, write_jsonl(tmp_path / "in.jsonl", [r | {"prompt": hh_prompt} for r in RANKINGS]), "ranking")
    n, snapshot_id = export_file(store, tmp_path / "first", fmt)
    more = LabelIn("later", [Message("user", "new?")], ["p", "q"], [0, 1], "HUMAN", "dave")
    assert store.ingest([more])[0].status == "INSERTED"
    assert export_file(store, tmp_path / "again", fmt, snapshot_id) == (n, snapshot_id)
    assert (tmp_path / "again").read_bytes() == (tmp_path / "first").read_bytes()
    n_now, now_id = export_file(store, tmp_path / "now", fmt)
    assert now_id != snapshot_id and n_now == n + 1


def test_malformed_lines_are_reported_with_line_numbers(store, tmp_path):
    good = {"prompt": [msg("user", "q")], "chosen": [msg("assistant", "a")], "rejected": [msg("assistant", "b")]}
    lines = [
        good,  # 1
        "{not json",  # 2
        "",  # 3 blank: skipped
        {"prompt": [msg("user", "q")], "chosen": [msg("assistant", "a")]},  # 4 no rejected
        {
            "chosen": [msg("user", "x"), msg("assistant", "a")],
            "rejected": [msg("user", "y"), msg("assistant", "b")],
        },  # 5
        {"chosen": [msg("user", "x"), msg("user", "a")], "rejected": [msg("user", "x"), msg("assistant", "b")]},  # 6
        {
            "prompt": [msg("user", "q")],
            "chosen": [msg("assistant", "same")],
            "rejected": [msg("assistant", "same")],
        },  # 7 store
        {**good, "margin": 1, "strength": 1},  # 8
        [1, 2],  # 9
        {"prompt": [msg("user", "q2")], "chosen": [msg("assistant", "c")], "rejected": [msg("assistant", "d")]},  # 10
    ]
    counts, reasons = import_file(store, write_jsonl(tmp_path / "bad.jsonl", lines), "trl")
    assert (counts["INSERTED"], counts["REJECTED"]) == (2, 7)
    by_line = {r.split(":", 1)[0]: r for r in reasons}
    assert sorted(by_line, key=lambda k: int(k.split()[1])) == [f"line {n}" for n in (2, 4, 5, 6, 7, 8, 9)]
    assert "not a JSON line" in by_line["line 2"]
    assert "rejected must be a list" in by_line["line 4"]
    assert "share every message" in by_line["line 5"]
    assert "last message of chosen" in by_line["line 6"]
    assert (
        by_line["line 7"].startswith("line 7: trl-")
        and "responses: responses must all be different" in by_line["line 7"]
    )
    assert "not both" in by_line["line 8"] and "not a JSON object" in by_line["line 9"]


def test_malformed_ranking_lines(store, tmp_path):
    lines = [
        ranking("ok", [0, 1]),
        ranking("typo", [0, 1], rank=[0, 1]),
        ranking("short", [0, 1]) | {"ranks": [0]},
        ranking("bool", [0, 1]) | {"ranks": [True, False]},
        ranking("meta", [0, 1], metadata={"n": 1}),
    ]
    counts, reasons = import_file(store, write_jsonl(tmp_path / "bad.jsonl", lines), "ranking")
    assert counts["INSERTED"] == 1 and counts["REJECTED"] == 4
    assert reasons[0].startswith("line 2: unknown keys ['rank']")
    assert any(r.startswith("line 3: short: ranks: needs one rank per response") for r in reasons)
    assert any(r.startswith("line 4: ranks must be a list of integers") for r in reasons)
    assert any(r.startswith("line 5: metadata must map strings") for r in reasons)


@pytest.mark.parametrize("fmt", ["trl", "ranking", "parquet"])
def test_reimport_is_all_duplicate(store, tmp_path, fmt):
    import_file(store, write_jsonl(tmp_path / "in.jsonl", RANKINGS), "ranking")
    path = tmp_path / f"export.{fmt}"
    export_file(store, path, fmt)
    counts, _ = import_file(store, path, fmt)
    again, reasons = import_file(store, path, fmt)
    assert sum(counts.values()) == sum(again.values()) == again["DUPLICATE"] > 0 and reasons == []


def test_a_conflicting_label_id_is_reported(store, tmp_path):
    import_file(store, write_jsonl(tmp_path / "a.jsonl", [ranking("same", [0, 1])]), "ranking")
    counts, reasons = import_file(store, write_jsonl(tmp_path / "b.jsonl", [ranking("same", [1, 0])]), "ranking")
    assert counts["CONFLICT"] == 1 and reasons == ["line 1: same: label_id already stored with a different payload"]


def test_missing_files_unknown_formats_and_unreadable_parquet(store, tmp_path):
    for fmt in ("hh", "trl", "ranking", "parquet"):
        with pytest.raises(FileNotFoundError):
            import_file(store, tmp_path / "missing", fmt)
    with pytest.raises(InvalidArgument, match="format"):
        import_file(store, tmp_path / "x", "csv")
    with pytest.raises(NotFound):
        export_file(store, tmp_path / "x", "ranking", "snap-999999")
    counts, reasons = import_file(store, write_jsonl(tmp_path / "not.parquet", ["{}"]), "parquet")
    assert counts["REJECTED"] == 1 and reasons[0].startswith("file: cannot read not.parquet as Parquet")


def test_an_export_taken_during_ingestion_equals_its_snapshot(tmp_path):
    """A thread keeps ingesting while the snapshot is exported; the file holds exactly the
    labels committed up to the snapshot, and exporting the same id again gives the same bytes."""
    import threading

    from rm_service.conversation import Message
    from rm_service.store.labels import LabelIn
    from rm_service.store.read import labels_in_snapshot

    store = Store(StoreSettings(path=tmp_path / "rm.duckdb"))
    stop, counter = threading.Event(), [0]

    def ingest() -> None:
        while not stop.is_set():
            n = counter[0]
            store.ingest(
                [
                    LabelIn(
                        f"live-{n}-{i}",
                        [Message("user", f"question {n}.{i}")],
                        [f"yes {n}", f"no {n}"],
                        [0, 1],
                        "HUMAN",
                        "ann",
                    )
                    for i in range(5)
                ]
            )
            counter[0] += 1

    writer = threading.Thread(target=ingest)
    writer.start()
    try:
        while counter[0] < 5:
            stop.wait(0.01)
        snapshot = store.create_snapshot()
        first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
        export_file(store, first, "ranking", snapshot.snapshot_id)
        while counter[0] < 15:  # more labels land between the two exports
            stop.wait(0.01)
        export_file(store, second, "ranking", snapshot.snapshot_id)
    finally:
        stop.set()
        writer.join()
    assert first.read_bytes() == second.read_bytes()
    exported = [json.loads(line)["label_id"] for line in first.read_text().splitlines()]
    assert (
        exported == [lab.label_id for lab in labels_in_snapshot(store, snapshot)]
        and len(exported) == snapshot.num_labels
    )
    assert store.stats()["labels_total"] > snapshot.num_labels  # ingestion really went on
    store.close()


def test_the_registry_is_the_one_list_of_formats(tmp_path):
    """Every module of rm_service/formats/ but the shared ones is a registered format with
    import_labels and export_labels, and the CLI offers exactly the registered formats."""
    import subprocess
    import sys

    from rm_service import cli, formats

    shared = {"__init__", "ingest", "records"}
    modules = {p.stem for p in Path(formats.__file__).parent.glob("*.py")} - shared
    assert set(formats.FORMATS) == modules == {"hh", "trl", "ranking", "parquet", "feedback"}
    assert set(formats.PAIR_FORMATS) == {"hh", "trl", "ranking", "parquet"}  # what `eval --data` reads
    for spec in formats.REGISTRY:
        assert callable(spec.module().import_labels) and callable(spec.module().export_labels)
        assert spec.unit in ("pairs", "labels") and spec.help
    assert cli.FORMAT_CHOICES == list(formats.FORMATS)
    shown = subprocess.run(
        [sys.executable, "-m", "rm_service.cli", "import", "--help"], capture_output=True, text=True, timeout=60
    ).stdout
    assert all(f"{spec.name}: {spec.help.split()[0]}" in " ".join(shown.split()) for spec in formats.REGISTRY)
