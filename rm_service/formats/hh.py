"""The HH-RLHF text format (Anthropic's hh-rlhf): one JSON object a line,
`{"chosen": str, "rejected": str}`, each a whole conversation:

    "\\n\\nHuman: <turn>\\n\\nAssistant: <turn> ... \\n\\nAssistant: <final turn>"

The two share every turn but the final assistant turn. A pair maps to prompt = every turn
before the final one (roles user/assistant), chosen/rejected = the two final turns.
Turn text is kept byte for byte, so export(import(file)) reproduces each line's text.

Import: one label a line, responses [chosen, rejected], ranks [0, 1], source IMPORT, label id
from the line's hash, metadata {"format": "hh", "file": <file name>, "line": <N>}. Export: one
line per pair of the snapshot; HH text has only Human and Assistant turns, so pairs whose prompt
has a system message are left out with a warning (use the trl or ranking format).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from rm_service.conversation import HHFormatError, Message, parse_conversation, render_conversation
from rm_service.formats.ingest import import_records
from rm_service.formats.records import FormatError, Record, jsonl_records, write_jsonl
from rm_service.store.db import Snapshot, Store
from rm_service.store.labels import LabelIn

__all__ = [
    "HHFormatError",
    "HHPair",
    "parse_conversation",
    "parse_pair",
    "read_pairs",
    "render_conversation",
    "render_pair",
]
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HHPair:
    prompt: list[Message]
    chosen: str
    rejected: str


def parse_pair(record: dict) -> HHPair:
    for key in ("chosen", "rejected"):
        if not isinstance(record.get(key), str):
            raise HHFormatError(f"field {key!r} is missing or not a string")
    chosen = parse_conversation(record["chosen"])
    rejected = parse_conversation(record["rejected"])
    if chosen[-1].role != "assistant" or rejected[-1].role != "assistant":
        raise HHFormatError("the final turn is not an Assistant turn")
    if chosen[:-1] != rejected[:-1]:
        raise HHFormatError("chosen and rejected do not share the turns before the final one")
    return HHPair(chosen[:-1], chosen[-1].content, rejected[-1].content)


def render_pair(prompt: list[Message], chosen: str, rejected: str) -> dict[str, str]:
    return {
        "chosen": render_conversation([*prompt, Message("assistant", chosen)]),
        "rejected": render_conversation([*prompt, Message("assistant", rejected)]),
    }


def read_pairs(path: Path) -> Iterator[tuple[int, str, HHPair | HHFormatError]]:
    """(line number, line hash, pair or the error that line raised) for every non-empty line,
    read as rm_service.formats.records reads every importer's lines (bytes, a line limit, UTF-8)."""
    for record in jsonl_records(path):
        try:
            if isinstance(record.data, FormatError):
                raise HHFormatError(str(record.data))
            yield record.number, record.digest, parse_pair(record.data)
        except HHFormatError as exc:
            yield record.number, record.digest, HHFormatError(f"line {record.number}: {exc}")


def hh_label(record: Record, label_id: str, annotator: str, file: str) -> LabelIn:
    """The label of one HH line (source IMPORT; label_id from the line's hash, so a re-import
    is idempotent); raises FormatError."""
    try:
        pair = parse_pair(record.fields)
    except HHFormatError as exc:
        raise FormatError(str(exc)) from None
    return LabelIn(
        label_id=label_id,
        prompt=pair.prompt,
        responses=[pair.chosen, pair.rejected],
        ranks=[0, 1],
        source="IMPORT",
        annotator=annotator,
        metadata={"format": "hh", "file": file, "line": str(record.number)},
    )


def import_labels(store: Store, path: Path, annotator: str) -> tuple[Counter, list[str]]:
    """Import an HH file; returns counts per outcome and the reasons for rejected lines."""
    return import_records(store, jsonl_records(path), partial(hh_label, file=Path(path).name), "hh", annotator)


def export_labels(store: Store, out: Path, snapshot: Snapshot) -> int:
    """Write a snapshot's pairs in HH format (one line per chosen/rejected pair); returns the lines."""
    all_pairs = store.pairs(snapshot)
    pairs = [p for p in all_pairs if all(m.role != "system" for m in p.prompt)]
    if len(pairs) < len(all_pairs):
        log.warning(
            "left out %d pairs with system messages: the HH format cannot hold them", len(all_pairs) - len(pairs)
        )
    write_jsonl(out, [render_pair(p.prompt, p.chosen, p.rejected) for p in pairs])
    return len(pairs)
