"""Import and export of preference files in four formats: hh, trl, ranking, parquet.

JSONL files are UTF-8, one JSON object a line; blank lines are skipped.

hh       Anthropic's HH-RLHF text pairs, `{"chosen": str, "rejected": str}`: see
         rm_service.store.hh. Handled by rm_service.importers (import_hh, export_hh).

trl      TRL's preference format, standard or conversational, explicit or implicit prompt,
         extra columns kept as metadata: see rm_service.trl, which documents import and export.
         Label ids, annotators, sources and ties are not exported (a K-way label gives several
         lines): use "ranking" for an exact copy.

ranking  Our K-way ranking JSONL, one label a line, keys in this order:
             {"label_id": str, "prompt": [{"role": str, "content": str}, ...],
              "responses": [str, ...], "ranks": [int, ...], "source": "HUMAN|JUDGE|IMPORT",
              "annotator": str, "strength": float | null, "rationale": str,
              "metadata": {str: str}, "task_id": str}
         ranks[i] is the rank of responses[i]: 0 is best, equal ranks tie, the ranking is dense.
         Import needs prompt, responses and ranks; a missing or null key takes its default
         (strength null, rationale "", metadata {}, task_id "", source and annotator as below);
         an unknown key makes the line malformed. Export writes every key of every label of the
         snapshot (labels_in_snapshot, commit order, metadata keys sorted, "" for no task), so
         import -> export is exact, ties included.

parquet  One row per label with the columns of "ranking", in the same order:
             label_id VARCHAR, prompt STRUCT(role VARCHAR, content VARCHAR)[],
             responses VARCHAR[], ranks INTEGER[], source VARCHAR, annotator VARCHAR,
             strength DOUBLE, rationale VARCHAR, metadata MAP(VARCHAR, VARCHAR), task_id VARCHAR
         Import and export rules are those of "ranking". Files are written and read by DuckDB's
         own Parquet writer and reader (an in-memory connection; no pyarrow or pandas).

Import (every format) reads the file through rm_service.records and stores it through
rm_service.importers.import_records: a record without a label_id (missing or null) gets
`f"{fmt}-{sha256(record)[:24]}"`, the record being the line's bytes without its line ending,
or a Parquet row as compact JSON with sorted keys; re-importing a file is therefore all
DUPLICATE. source defaults to IMPORT, annotator to the `annotator` argument (default: the
format name). Every malformed record (not UTF-8, not a JSON object, longer than
records.MAX_LINE_BYTES, not in the format), and every label the store rejects (ranks not
below K, strengths not finite or above the limit, too many responses, oversized text) or
finds in conflict, gives one reason "line N: ..." ("row N: ..." for Parquet, 1-based in file
order, "file: ..." for an unreadable Parquet file) and never stops the other records;
REJECTED counts malformed records and labels the store rejected. A path that is not a
readable file raises OSError (FileNotFoundError, IsADirectoryError, PermissionError) with a
one-line message before anything is stored; a store failure part-way raises
importers.ImportStopped, which says which records were stored.

Export reads one snapshot, a new one of everything unless `snapshot_id` names one, so the
export of a given snapshot id stays the same while ingestion goes on.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import duckdb

from rm_service.errors import InvalidArgument
from rm_service.feedback_format import export_feedback, import_feedback
from rm_service.importers import export_hh, import_hh, import_records
from rm_service.records import FormatError, Record, input_file, ints, jsonl_records, messages, metadata, parquet_records, string, strength, strings
from rm_service.store.db import Snapshot, Store
from rm_service.store.labels import LabelIn
from rm_service.store.read import labels_in_snapshot
from rm_service.trl import trl_label, trl_records

FORMATS = ("hh", "trl", "ranking", "parquet", "feedback")  # feedback: per-turn thumbs and session outcomes (rm_service.feedback_format)
RANKING_KEYS = ("label_id", "prompt", "responses", "ranks", "source", "annotator", "strength", "rationale", "metadata", "task_id")
PARQUET_COLUMNS = (
    "label_id VARCHAR, prompt STRUCT(role VARCHAR, content VARCHAR)[], responses VARCHAR[], ranks INTEGER[], "
    "source VARCHAR, annotator VARCHAR, strength DOUBLE, rationale VARCHAR, metadata MAP(VARCHAR, VARCHAR), task_id VARCHAR"
)


# -- ranking (JSONL and Parquet) -----------------------------------------------------------


def ranking_label(record: Record, default_id: str, annotator: str) -> LabelIn:
    """The label of one K-way ranking record; raises FormatError."""
    data = record.data
    unknown = sorted(set(data) - set(RANKING_KEYS))
    if unknown:
        raise FormatError(f"unknown keys {[k[:40] for k in unknown[:5]]}; expected {', '.join(RANKING_KEYS)}")
    return LabelIn(
        label_id=string(data, "label_id", default_id), prompt=messages(data.get("prompt"), "prompt"),
        responses=strings(data.get("responses"), "responses"), ranks=ints(data.get("ranks"), "ranks"),
        source=string(data, "source", "IMPORT"), annotator=string(data, "annotator", annotator),
        strength=strength(data, "strength"), rationale=string(data, "rationale", ""),
        metadata=metadata(data.get("metadata")), task_id=string(data, "task_id", ""),
    )


def ranking_record(label: LabelIn) -> dict:
    """The K-way ranking record of a label: every key of RANKING_KEYS, in that order."""
    return {
        "label_id": label.label_id, "prompt": [m.as_dict() for m in label.prompt], "responses": label.responses,
        "ranks": label.ranks, "source": label.source, "annotator": label.annotator, "strength": label.strength,
        "rationale": label.rationale, "metadata": dict(sorted(label.metadata.items())), "task_id": label.task_id,
    }


# -- import --------------------------------------------------------------------------------


def import_trl(store: Store, path: Path, annotator: str = "trl") -> tuple[Counter, list[str]]:
    """Import a TRL preference JSONL file (any shape rm_service.trl accepts)."""
    return import_records(store, jsonl_records(path), trl_label, "trl", annotator)


def import_ranking(store: Store, path: Path, annotator: str = "ranking") -> tuple[Counter, list[str]]:
    """Import a K-way ranking JSONL file."""
    return import_records(store, jsonl_records(path), ranking_label, "ranking", annotator)


def import_parquet(store: Store, path: Path, annotator: str = "parquet") -> tuple[Counter, list[str]]:
    """Import a Parquet file with the K-way ranking columns."""
    return import_records(store, parquet_records(path), ranking_label, "parquet", annotator)


# -- export --------------------------------------------------------------------------------


def _snapshot(store: Store, snapshot_id: str | None) -> Snapshot:
    return store.get_snapshot(snapshot_id) if snapshot_id else store.create_snapshot()


def _write_jsonl(out: Path, records: list[dict]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def _write_parquet(out: Path, records: list[dict]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    columns = [[r[key] for r in records] for key in RANKING_KEYS if key != "metadata"]
    keys = [list(r["metadata"]) for r in records]
    values = [list(r["metadata"].values()) for r in records]
    with duckdb.connect() as con:
        con.execute(f"CREATE TABLE labels ({PARQUET_COLUMNS})")
        con.execute(
            """INSERT INTO labels
               SELECT label_id, prompt, responses, ranks, source, annotator, strength, rationale, map(keys, vals), task_id
               FROM (SELECT unnest(?::VARCHAR[]) AS label_id, unnest(?::STRUCT(role VARCHAR, content VARCHAR)[][]) AS prompt,
                            unnest(?::VARCHAR[][]) AS responses, unnest(?::INTEGER[][]) AS ranks, unnest(?::VARCHAR[]) AS source,
                            unnest(?::VARCHAR[]) AS annotator, unnest(?::DOUBLE[]) AS strength, unnest(?::VARCHAR[]) AS rationale,
                            unnest(?::VARCHAR[]) AS task_id, unnest(?::VARCHAR[][]) AS keys, unnest(?::VARCHAR[][]) AS vals,
                            generate_subscripts(?::VARCHAR[], 1) AS i)
               ORDER BY i""",
            [*columns, keys, values, columns[0]],
        )
        target = str(out).replace("'", "''")
        con.execute(f"COPY labels TO '{target}' (FORMAT parquet)")


def export_trl(store: Store, out: Path, snapshot_id: str | None = None) -> tuple[int, str]:
    """Write a snapshot's pairs as explicit-prompt TRL JSONL; returns (lines, snapshot id)."""
    snapshot = _snapshot(store, snapshot_id)
    records = trl_records(store.pairs(snapshot))
    _write_jsonl(out, records)
    return len(records), snapshot.snapshot_id


def export_ranking(store: Store, out: Path, snapshot_id: str | None = None) -> tuple[int, str]:
    """Write a snapshot's labels as K-way ranking JSONL; returns (labels, snapshot id)."""
    snapshot = _snapshot(store, snapshot_id)
    records = [ranking_record(label) for label in labels_in_snapshot(store, snapshot)]
    _write_jsonl(out, records)
    return len(records), snapshot.snapshot_id


def export_parquet(store: Store, out: Path, snapshot_id: str | None = None) -> tuple[int, str]:
    """Write a snapshot's labels as Parquet; returns (rows, snapshot id)."""
    snapshot = _snapshot(store, snapshot_id)
    records = [ranking_record(label) for label in labels_in_snapshot(store, snapshot)]
    _write_parquet(out, records)
    return len(records), snapshot.snapshot_id


# -- dispatch ------------------------------------------------------------------------------

_IMPORTERS = {"hh": import_hh, "trl": import_trl, "ranking": import_ranking, "parquet": import_parquet, "feedback": import_feedback}
_EXPORTERS = {"hh": export_hh, "trl": export_trl, "ranking": export_ranking, "parquet": export_parquet, "feedback": export_feedback}


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise InvalidArgument("format", f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")


def import_file(store: Store, path: Path | str, fmt: str, annotator: str | None = None) -> tuple[Counter, list[str]]:
    """Import a file of format `fmt`; annotator None means the format's default
    ("hh-rlhf" for hh, else the format name). Returns counts per status and the reasons."""
    _check_format(fmt)
    importer = _IMPORTERS[fmt]
    path = input_file(Path(path))
    return importer(store, path) if annotator is None else importer(store, path, annotator)


def export_file(store: Store, path: Path | str, fmt: str, snapshot_id: str | None = None) -> tuple[int, str]:
    """Export a snapshot (a new one unless snapshot_id is given) as `fmt`; returns
    (records written, snapshot id)."""
    _check_format(fmt)
    return _EXPORTERS[fmt](store, Path(path), snapshot_id)
