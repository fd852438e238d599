"""The "feedback" file format: per-turn thumbs and session outcomes as JSONL (docs/feedback.md).

One feedback label a line, keys in this order:

    {"label_id": str, "conversation": [{"role": str, "content": str}, ...],
     "thumbs": [{"message_index": int, "up": bool}, ...], "outcome": float | null,
     "source": "HUMAN|JUDGE|IMPORT", "annotator": str, "rationale": str,
     "metadata": {str: str}, "task_id": str}

`conversation` is the whole conversation; a thumb names an assistant turn by its index in it
(one after the first user turn); `outcome` is the session's result in [0, 1] (1 = success,
0 = failure). A line needs `conversation` and thumbs or an outcome (or both); a missing or null
key takes its default (thumbs [], outcome null, rationale "", metadata {}, task_id "", source
IMPORT, annotator the import's); an unknown key makes the line malformed. Values are the
store's to check (store.feedback.validate_feedback): a turn out of range, a user turn, an
outcome outside [0, 1] or not finite reject that line alone with its reason.

Import and export follow the rules of the other formats (rm_service.formats): label ids from the
line's hash when missing, so a re-import is all DUPLICATE; export writes every key of every
feedback label of one snapshot in commit order (thumbs in turn order, metadata keys sorted), so
import -> export is exact.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from rm_service.formats.ingest import import_records
from rm_service.formats.records import (
    FormatError,
    Record,
    jsonl_records,
    known_keys,
    messages,
    metadata,
    strength,
    string,
    write_jsonl,
)
from rm_service.store.db import Snapshot, Store
from rm_service.store.feedback import FeedbackIn, TurnThumb, feedback_in_snapshot

FEEDBACK_KEYS = (
    "label_id",
    "conversation",
    "thumbs",
    "outcome",
    "source",
    "annotator",
    "rationale",
    "metadata",
    "task_id",
)
THUMB_KEYS = ("message_index", "up")


def feedback_label(record: Record, default_id: str, annotator: str) -> FeedbackIn:
    """The feedback label of one line; raises FormatError naming the key."""
    data = known_keys(record.fields, FEEDBACK_KEYS)
    return FeedbackIn(
        label_id=string(data, "label_id", default_id),
        conversation=messages(data.get("conversation"), "conversation"),
        thumbs=_thumbs(data.get("thumbs")),
        outcome=strength(data, "outcome"),
        source=string(data, "source", "IMPORT"),
        annotator=string(data, "annotator", annotator),
        rationale=string(data, "rationale", ""),
        metadata=metadata(data.get("metadata")),
        task_id=string(data, "task_id", ""),
    )


def _thumbs(value: object) -> list[TurnThumb]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise FormatError('thumbs must be a list of {"message_index": int, "up": bool}')
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, dict) or set(item) != set(THUMB_KEYS):
            raise FormatError(f"thumbs[{i}] must be an object with exactly the keys message_index and up")
        index, up = item["message_index"], item["up"]
        if isinstance(index, bool) or not isinstance(index, int):
            raise FormatError(f"thumbs[{i}].message_index must be an integer")
        if not isinstance(up, bool):
            raise FormatError(f"thumbs[{i}].up must be true or false")
        out.append(TurnThumb(index, up))
    return out


def feedback_record(fb: FeedbackIn) -> dict:
    """The line of a feedback label: every key of FEEDBACK_KEYS, in that order."""
    return {
        "label_id": fb.label_id,
        "conversation": [m.as_dict() for m in fb.conversation],
        "thumbs": [{"message_index": t.message_index, "up": t.up} for t in fb.thumbs],
        "outcome": fb.outcome,
        "source": fb.source,
        "annotator": fb.annotator,
        "rationale": fb.rationale,
        "metadata": dict(sorted(fb.metadata.items())),
        "task_id": fb.task_id,
    }


def import_labels(store: Store, path: Path, annotator: str) -> tuple[Counter, list[str]]:
    """Import a feedback JSONL file through the one ingest loop."""
    return import_records(store, jsonl_records(path), feedback_label, "feedback", annotator)


def export_labels(store: Store, out: Path, snapshot: Snapshot) -> int:
    """Write a snapshot's feedback labels; returns the lines written."""
    records = [feedback_record(fb) for fb in feedback_in_snapshot(store, snapshot)]
    write_jsonl(out, records)
    return len(records)
