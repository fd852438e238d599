"""The one import loop every format uses.

`import_records` streams a file's records (rm_service.formats.records): each is parsed into a label
or rejected with its line number and reason, and labels are stored through Store.ingest in
batches of BATCH, each batch one transaction. Nothing stops it but a failure of the store
itself (or Ctrl-C); then it raises ImportStopped, which says where it stopped: every record
before that point was stored or rejected as reported, nothing from it on was stored, and
running the same import again completes it (label ids come from record content, so records
already stored come back DUPLICATE).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable

from rm_service.formats.records import FormatError, Record
from rm_service.store.db import Store
from rm_service.store.feedback import FeedbackIn
from rm_service.store.labels import LabelIn

BATCH = 1000

# (record, label id derived from its content, annotator) -> label; raises FormatError
Parse = Callable[[Record, str, str], LabelIn | FeedbackIn]


class ImportStopped(Exception):
    """An import that stopped before the end of its file, with what it had done."""

    def __init__(self, counts: Counter, reasons: list[str], resume_at: str, cause: BaseException):
        self.counts, self.reasons, self.resume_at, self.cause = counts, reasons, resume_at, cause
        super().__init__(
            f"the import stopped at {resume_at} ({type(cause).__name__}: "
            f"{str(cause).splitlines()[0] if str(cause) else 'interrupted'}). Every record before {resume_at} was "
            f"stored or rejected as reported; nothing from {resume_at} on was stored. Run the same import again to "
            "complete it (records already stored come back DUPLICATE)"
        )


def import_records(
    store: Store, records: Iterable[Record], parse: Parse, fmt: str, annotator: str
) -> tuple[Counter, list[str]]:
    """Parse and store every record; counts per status and one reason per record not stored."""
    counts: Counter = Counter({"REJECTED": 0})
    reasons: list[tuple[int, str]] = []  # (record number, reason): sorted into file order at the end
    batch: list[tuple[Record, LabelIn | FeedbackIn]] = []
    resume_at = "line 1"

    def flush() -> None:
        outcomes = store.ingest([label for _, label in batch], origin="dataset")
        for i, ((record, _), outcome) in enumerate(zip(batch, outcomes, strict=True)):
            counts[outcome.status] += 1
            if outcome.status in ("REJECTED", "CONFLICT"):
                reasons.append(
                    (
                        record.number,
                        f"{record.where}: {outcome.label_id}: {outcome.reason.removeprefix(f'labels[{i}].')}",
                    )
                )
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
    except (Exception, KeyboardInterrupt) as exc:
        raise ImportStopped(counts, _in_order(reasons), resume_at, exc) from exc
    return counts, _in_order(reasons)


def _in_order(reasons: list[tuple[int, str]]) -> list[str]:
    return [reason for _, reason in sorted(reasons, key=lambda r: r[0])]


def _parse(record: Record, parse: Parse, fmt: str, annotator: str) -> LabelIn | FeedbackIn | FormatError:
    if isinstance(record.data, FormatError):
        return record.data
    try:
        return parse(record, f"{fmt}-{record.digest}", annotator)
    except FormatError as exc:
        return exc
