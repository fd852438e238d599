"""Import and export of preference files: one module a format, one ingest loop, one registry.

The formats (each module's docstring defines its format exactly):

hh       rm_service.formats.hh       Anthropic's HH-RLHF text pairs, `{"chosen": str, "rejected": str}`.
trl      rm_service.formats.trl      TRL's preference format, standard or conversational, explicit or
                                     implicit prompt, extra columns kept as metadata. Label ids,
                                     annotators, sources and ties are not exported (a K-way label
                                     gives several lines): use "ranking" for an exact copy.
ranking  rm_service.formats.ranking  Our K-way ranking JSONL, one label a line; import -> export is exact.
parquet  rm_service.formats.parquet  The columns of "ranking" as Parquet (DuckDB's own writer and reader).
feedback rm_service.formats.feedback Per-turn thumbs and session outcomes, one label a line; import -> export is exact.

JSONL files are UTF-8, one JSON object a line; blank lines are skipped.

Import (every format) reads the file through rm_service.formats.records and stores it through
the one ingest loop, rm_service.formats.ingest.import_records: a record without a label_id
(missing or null) gets `f"{fmt}-{sha256(record)[:24]}"`, the record being the line's bytes
without its line ending, or a Parquet row as compact JSON with sorted keys; re-importing a file
is therefore all DUPLICATE. source defaults to IMPORT, annotator to the `annotator` argument
(default: the format's, `Format.annotator`). Every malformed record (not UTF-8, not a JSON
object, longer than records.MAX_LINE_BYTES, not in the format), and every label the store
rejects (ranks not below K, strengths not finite or above the limit, too many responses,
oversized text) or finds in conflict, gives one reason "line N: ..." ("row N: ..." for Parquet,
1-based in file order, "file: ..." for an unreadable Parquet file) and never stops the other
records; REJECTED counts malformed records and labels the store rejected. A path that is not a
readable file raises OSError (FileNotFoundError, IsADirectoryError, PermissionError) with a
one-line message before anything is stored; a store failure part-way raises
ingest.ImportStopped, which says which records were stored.

Export reads one snapshot, a new one of everything unless `snapshot_id` names one, so the
export of a given snapshot id stays the same while ingestion goes on.

A new format is a module `rm_service/formats/<name>.py` with two functions,
`import_labels(store, path, annotator) -> (counts, reasons)` (parse each record into a LabelIn
and hand the records to `ingest.import_records`) and `export_labels(store, out, snapshot) ->
records written`, plus one `Format` line in REGISTRY below: the CLI's `--format` choices and
help come from it. Modules are imported when their format is first used, so the CLI starts
without loading the store.
"""

from __future__ import annotations

import importlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from rm_service.errors import InvalidArgument

if TYPE_CHECKING:
    from rm_service.store.db import Store


@dataclass(frozen=True)
class Format:
    name: str  # the --format value, and its module rm_service/formats/<name>.py
    help: str  # one line, for the CLI's --format help
    unit: str  # what export writes one of: "pairs" or "labels"
    annotator: str  # the annotator of imported labels when none is given
    pairs: bool = True  # its records are preference pairs (`rm-service eval --data` reads them)

    def module(self) -> ModuleType:
        return importlib.import_module(f"{__name__}.{self.name}")


REGISTRY = (
    Format("hh", "HH-RLHF text pairs", "pairs", "hh-rlhf"),
    Format("trl", "TRL preference JSONL (standard or conversational, explicit or implicit prompt)", "pairs", "trl"),
    Format("ranking", "K-way rankings with ties, JSONL", "labels", "ranking"),
    Format("parquet", "the ranking columns as Parquet", "labels", "parquet"),
    Format(
        "feedback", "per-turn thumbs and session outcomes, JSONL (docs/feedback.md)", "labels", "feedback", pairs=False
    ),
)
FORMATS = tuple(f.name for f in REGISTRY)
PAIR_FORMATS = tuple(f.name for f in REGISTRY if f.pairs)
HELP = "; ".join(f"{f.name}: {f.help}" for f in REGISTRY)


def get(fmt: str) -> Format:
    """The registered format `fmt`; InvalidArgument naming `format` for any other name."""
    for f in REGISTRY:
        if f.name == fmt:
            return f
    raise InvalidArgument("format", f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")


def import_file(store: Store, path: Path | str, fmt: str, annotator: str | None = None) -> tuple[Counter, list[str]]:
    """Import a file of format `fmt`; annotator None means the format's default
    ("hh-rlhf" for hh, else the format name). Returns counts per status and the reasons."""
    from rm_service.formats.records import input_file

    spec = get(fmt)
    path = input_file(Path(path))
    return spec.module().import_labels(store, path, spec.annotator if annotator is None else annotator)


def export_file(store: Store, path: Path | str, fmt: str, snapshot_id: str | None = None) -> tuple[int, str]:
    """Export a snapshot (a new one unless snapshot_id is given) as `fmt`; returns
    (records written, snapshot id)."""
    spec = get(fmt)
    snapshot = store.get_snapshot(snapshot_id) if snapshot_id else store.create_snapshot()
    assert snapshot is not None  # get_snapshot raises NotFound for an unknown id
    return spec.module().export_labels(store, Path(path), snapshot), snapshot.snapshot_id
