"""Our K-way ranking JSONL, one label a line, keys in this order:

    {"label_id": str, "prompt": [{"role": str, "content": str}, ...],
     "responses": [str, ...], "ranks": [int, ...], "source": "HUMAN|JUDGE|IMPORT",
     "annotator": str, "strength": float | null, "rationale": str,
     "metadata": {str: str}, "task_id": str}

ranks[i] is the rank of responses[i]: 0 is best, equal ranks tie, the ranking is dense.
Import needs prompt, responses and ranks; a missing or null key takes its default (strength
null, rationale "", metadata {}, task_id "", source IMPORT, annotator the import's); an unknown
key makes the line malformed. Export writes every key of every label of the snapshot
(labels_in_snapshot, commit order, metadata keys sorted, "" for no task), so import -> export
is exact, ties included. The parquet format holds the same records as columns.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

from rm_service.formats.ingest import import_records
from rm_service.formats.records import (
    Record,
    ints,
    jsonl_records,
    known_keys,
    messages,
    metadata,
    strength,
    string,
    strings,
    write_jsonl,
)
from rm_service.store.db import Snapshot, Store
from rm_service.store.labels import LabelIn
from rm_service.store.read import labels_in_snapshot

RANKING_KEYS = (
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
)


def ranking_label(record: Record, default_id: str, annotator: str) -> LabelIn:
    """The label of one K-way ranking record; raises FormatError."""
    data = known_keys(record.fields, RANKING_KEYS)
    return LabelIn(
        label_id=string(data, "label_id", default_id),
        prompt=messages(data.get("prompt"), "prompt"),
        responses=strings(data.get("responses"), "responses"),
        ranks=ints(data.get("ranks"), "ranks"),
        source=string(data, "source", "IMPORT"),
        annotator=string(data, "annotator", annotator),
        strength=strength(data, "strength"),
        rationale=string(data, "rationale", ""),
        metadata=metadata(data.get("metadata")),
        task_id=string(data, "task_id", ""),
    )


def ranking_record(label: LabelIn) -> dict:
    """The K-way ranking record of a label: every key of RANKING_KEYS, in that order."""
    return {
        "label_id": label.label_id,
        "prompt": [m.as_dict() for m in label.prompt],
        "responses": label.responses,
        "ranks": label.ranks,
        "source": label.source,
        "annotator": label.annotator,
        "strength": label.strength,
        "rationale": label.rationale,
        "metadata": dict(sorted(label.metadata.items())),
        "task_id": label.task_id,
    }


def import_labels(
    store: Store,
    path: Path,
    annotator: str,
    read: Callable[[Path], Iterator[Record]] = jsonl_records,
    fmt: str = "ranking",
) -> tuple[Counter, list[str]]:
    """Import a file of K-way ranking records: JSONL, or what `read` reads (parquet)."""
    return import_records(store, read(path), ranking_label, fmt, annotator)


def export_labels(
    store: Store, out: Path, snapshot: Snapshot, write: Callable[[Path, list[dict]], None] = write_jsonl
) -> int:
    """Write a snapshot's labels as K-way ranking records (JSONL, or with `write`); returns the labels written."""
    records = [ranking_record(label) for label in labels_in_snapshot(store, snapshot)]
    write(out, records)
    return len(records)
