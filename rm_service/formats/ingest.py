"""The one import loop every format uses, and the HH-RLHF text format's import and export.

`import_records` streams a file's records (rm_service.formats.records): each is parsed into a label
or rejected with its line number and reason, and labels are stored through Store.ingest in
batches of BATCH, each batch one transaction. Nothing stops it but a failure of the store
itself (or Ctrl-C); then it raises ImportStopped, which says where it stopped: every record
before that point was stored or rejected as reported, nothing from it on was stored, and
running the same import again completes it (label ids come from record content, so records
already stored come back DUPLICATE).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path

from rm_service.formats.records import FormatError, Record, jsonl_records
from rm_service.store.db import Store
from rm_service.formats.hh import HHFormatError, parse_pair, render_pair
from rm_service.store.labels import LabelIn

BATCH = 1000
log = logging.getLogger(__name__)

# (record, label id derived from its content, annotator) -> label; raises FormatError
Parse = Callable[[Record, str, str], LabelIn]


class ImportStopped(Exception):
    """An import that stopped before the end of its file, with what it had done."""

    def __init__(self, counts: Counter, reasons: list[str], resume_at: str, cause: BaseException):
        self.counts, self.reasons, self.resume_at, self.cause = counts, reasons, resume_at, cause
        super().__init__(
            f"the import stopped at {resume_at} ({type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else 'interrupted'}). "
            f"Every record before {resume_at} was stored or rejected as reported; nothing from {resume_at} on was stored. "
            "Run the same import again to complete it (records already stored come back DUPLICATE)"
        )


def import_records(store: Store, records: Iterable[Record], parse: Parse, fmt: str, annotator: str) -> tuple[Counter, list[str]]:
    """Parse and store every record; counts per status and one reason per record not stored."""
    counts: Counter = Counter({"REJECTED": 0})
    reasons: list[tuple[int, str]] = []  # (record number, reason): sorted into file order at the end
    batch: list[tuple[Record, LabelIn]] = []
    resume_at = "line 1"

    def flush() -> None:
        outcomes = store.ingest([label for _, label in batch], origin="dataset")
        for i, ((record, _), outcome) in enumerate(zip(batch, outcomes)):
            counts[outcome.status] += 1
            if outcome.status in ("REJECTED", "CONFLICT"):
                reasons.append((record.number, f"{record.where}: {outcome.label_id}: {outcome.reason.removeprefix(f'labels[{i}].')}"))
        batch.clear()

    try:
        for record in records:
            if not batch:
                resume_at = record.where
            label = _parse(record, parse, fmt, annotator)
            if isinstance(label, FormatError):
                counts["REJECTED"] += 1
                reasons.append((record.number, f"{record.where}: {label}"))
                if not batch:
                    resume_at = f"{record.unit} {record.number + 1}"
                continue
            batch.append((record, label))
            if len(batch) >= BATCH:
                flush()
                resume_at = f"{record.unit} {record.number + 1}"
        if batch:
            flush()
    except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - report what was stored, then stop
        raise ImportStopped(counts, _in_order(reasons), resume_at, exc) from exc
    return counts, _in_order(reasons)


def _in_order(reasons: list[tuple[int, str]]) -> list[str]:
    return [reason for _, reason in sorted(reasons, key=lambda r: r[0])]


def _parse(record: Record, parse: Parse, fmt: str, annotator: str) -> LabelIn | FormatError:
    if isinstance(record.data, FormatError):
        return record.data
    try:
        return parse(record, f"{fmt}-{record.digest}", annotator)
    except FormatError as exc:
        return exc


# -- HH-RLHF -------------------------------------------------------------------------------


def hh_label(record: Record, label_id: str, annotator: str, file: str) -> LabelIn:
    """The label of one HH line (source IMPORT; label_id from the line's hash, so a re-import
    is idempotent); raises FormatError."""
    try:
        pair = parse_pair(record.data)
    except HHFormatError as exc:
        raise FormatError(str(exc)) from None
    return LabelIn(label_id=label_id, prompt=pair.prompt, responses=[pair.chosen, pair.rejected], ranks=[0, 1], source="IMPORT",
                   annotator=annotator, metadata={"format": "hh", "file": file, "line": str(record.number)})


def import_hh(store: Store, path: Path, annotator: str = "hh-rlhf") -> tuple[Counter, list[str]]:
    """Import an HH file; returns counts per outcome and the reasons for rejected lines."""
    return import_records(store, jsonl_records(path), partial(hh_label, file=Path(path).name), "hh", annotator)


def export_hh(store: Store, out: Path, snapshot_id: str | None = None) -> tuple[int, str]:
    """Write a snapshot's pairs in HH format (one line per chosen/rejected pair).

    HH text has only Human and Assistant turns: pairs whose prompt has a system message
    cannot be written and are left out with a warning (use the trl or ranking format)."""
    snapshot = store.get_snapshot(snapshot_id) if snapshot_id else store.create_snapshot()
    all_pairs = store.pairs(snapshot)
    pairs = [p for p in all_pairs if all(m.role != "system" for m in p.prompt)]
    if len(pairs) < len(all_pairs):
        log.warning("left out %d pairs with system messages: the HH format cannot hold them", len(all_pairs) - len(pairs))
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for p in pairs:
            f.write(json.dumps(render_pair(p.prompt, p.chosen, p.rejected), ensure_ascii=False) + "\n")
    return len(pairs), snapshot.snapshot_id

