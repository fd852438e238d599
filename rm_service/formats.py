"""Import and export of preference files in four formats: hh, trl, ranking, parquet.

JSONL files are UTF-8, one JSON object a line; blank lines are skipped.

hh       Anthropic's HH-RLHF text pairs, `{"chosen": str, "rejected": str}`: see
         rm_service.store.hh. Handled by rm_service.importers (import_hh, export_hh).

trl      TRL's conversational preference JSONL. Explicit prompt:
             {"prompt":   [{"role": "user", "content": "..."}, ...],
              "chosen":   [{"role": "assistant", "content": "..."}],
              "rejected": [{"role": "assistant", "content": "..."}]}
         Implicit prompt (no "prompt" key): "chosen" and "rejected" are whole conversations
         that share every message but the last, which is an assistant message in both; the
         prompt is the shared messages. A message is exactly {"role": str, "content": str}.
         Optional keys: "label_id" (str), "annotator" (str), "source" ("HUMAN" | "JUDGE" |
         "IMPORT"), and "strength" or "margin" (a number >= 0, not both). Other keys are
         ignored (TRL datasets often carry extra columns such as scores). A line becomes a
         label with responses [chosen, rejected], ranks [0, 1] and metadata {"format": "trl"}.
         Export writes the explicit form, one line per pair of store.pairs(snapshot): the "all"
         policy, every two responses of a label with different ranks, the better one chosen.
         Ties give no pair, so a label whose responses all tie exports no line. The keys are
         "prompt", "chosen", "rejected" and, when the label has a strength, "margin". Label ids,
         annotators, sources and ties are not written (a K-way label gives several lines):
         use "ranking" for an exact copy.

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

Import (trl, ranking, parquet): a record without a label_id (missing or null) gets
`f"{fmt}-{sha256(record)[:24]}"`, the record being the line's bytes without its line ending,
or a Parquet row as compact JSON with sorted keys; re-importing a file is therefore all
DUPLICATE. source defaults to IMPORT, annotator to the `annotator` argument (default: the
format name). Labels are ingested in batches. Every malformed record, and every label the
store rejects or finds in conflict, gives one reason "line N: ..." ("row N: ..." for Parquet,
1-based in file order, "file: ..." for an unreadable Parquet file) and never stops the other
records; REJECTED counts malformed records and labels the store rejected. A missing file
raises FileNotFoundError.

Export reads one snapshot, a new one of everything unless `snapshot_id` names one, so the
export of a given snapshot id stays the same while ingestion goes on.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import duckdb

from rm_service.conversation import Message
from rm_service.errors import InvalidArgument
from rm_service.importers import BATCH, export_hh, import_hh
from rm_service.store.db import Pair, Snapshot, Store
from rm_service.store.labels import LabelIn
from rm_service.store.read import labels_in_snapshot

FORMATS = ("hh", "trl", "ranking", "parquet")
RANKING_KEYS = ("label_id", "prompt", "responses", "ranks", "source", "annotator", "strength", "rationale", "metadata", "task_id")
PARQUET_COLUMNS = (
    "label_id VARCHAR, prompt STRUCT(role VARCHAR, content VARCHAR)[], responses VARCHAR[], ranks INTEGER[], "
    "source VARCHAR, annotator VARCHAR, strength DOUBLE, rationale VARCHAR, metadata MAP(VARCHAR, VARCHAR), task_id VARCHAR"
)

Parse = Callable[[dict, str, str], LabelIn]


class FormatError(ValueError):
    """A record that is not in its file's format."""


@dataclass(frozen=True)
class _Record:
    where: str                  # "line 3", "row 3" or "file"
    digest: str                 # sha256 of the record, first 24 hex digits
    data: dict | FormatError


# -- field parsing -------------------------------------------------------------------------


def _message(value: object, field: str) -> Message:
    if not isinstance(value, dict) or set(value) != {"role", "content"} or not all(isinstance(v, str) for v in value.values()):
        raise FormatError(f"{field} must be an object with exactly the string keys 'role' and 'content'")
    return Message(value["role"], value["content"])


def _messages(value: object, field: str) -> list[Message]:
    if not isinstance(value, list):
        raise FormatError(f"{field} must be a list of messages")
    return [_message(m, f"{field}[{i}]") for i, m in enumerate(value)]


def _string(record: dict, key: str, default: str) -> str:
    value = record.get(key)
    if value is None:
        return default
    if not isinstance(value, str):
        raise FormatError(f"{key} must be a string")
    return value


def _strength(record: dict, key: str) -> float | None:
    value = record.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FormatError(f"{key} must be a number or null")
    return float(value)


def _strings(value: object, field: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise FormatError(f"{field} must be a list of strings")
    return value


def _ints(value: object, field: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise FormatError(f"{field} must be a list of integers")
    return value


def _metadata(value: object) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise FormatError("metadata must map strings to strings")
    return value


# -- trl -----------------------------------------------------------------------------------


def trl_label(record: dict, default_id: str, annotator: str) -> LabelIn:
    """The label of one TRL record (explicit or implicit prompt); raises FormatError."""
    prompt, chosen, rejected = _trl_turns(record)
    return LabelIn(
        label_id=_string(record, "label_id", default_id), prompt=prompt, responses=[chosen, rejected], ranks=[0, 1],
        source=_string(record, "source", "IMPORT"), annotator=_string(record, "annotator", annotator),
        strength=_trl_strength(record), metadata={"format": "trl"},
    )


def _trl_turns(record: dict) -> tuple[list[Message], str, str]:
    chosen = _messages(record.get("chosen"), "chosen")
    rejected = _messages(record.get("rejected"), "rejected")
    if "prompt" in record:
        for name, messages in (("chosen", chosen), ("rejected", rejected)):
            if len(messages) != 1 or messages[0].role != "assistant":
                raise FormatError(f"{name} must be exactly one assistant message when a prompt is given")
        return _messages(record["prompt"], "prompt"), chosen[0].content, rejected[0].content
    for name, messages in (("chosen", chosen), ("rejected", rejected)):
        if not messages or messages[-1].role != "assistant":
            raise FormatError(f"the last message of {name} must be an assistant message (implicit prompt)")
    if chosen[:-1] != rejected[:-1]:
        raise FormatError("chosen and rejected must share every message but the last (implicit prompt)")
    return chosen[:-1], chosen[-1].content, rejected[-1].content


def _trl_strength(record: dict) -> float | None:
    if "strength" in record and "margin" in record:
        raise FormatError("give strength or margin, not both")
    return _strength(record, "margin" if "margin" in record else "strength")


def trl_record(pair: Pair) -> dict:
    """The explicit-prompt TRL record of one pair; "margin" only when the label has a strength."""
    record: dict = {
        "prompt": [m.as_dict() for m in pair.prompt],
        "chosen": [Message("assistant", pair.chosen).as_dict()],
        "rejected": [Message("assistant", pair.rejected).as_dict()],
    }
    if pair.strength is not None:
        record["margin"] = pair.strength
    return record


# -- ranking (JSONL and Parquet) -----------------------------------------------------------


def ranking_label(record: dict, default_id: str, annotator: str) -> LabelIn:
    """The label of one K-way ranking record; raises FormatError."""
    unknown = sorted(set(record) - set(RANKING_KEYS))
    if unknown:
        raise FormatError(f"unknown keys {unknown}; expected {', '.join(RANKING_KEYS)}")
    return LabelIn(
        label_id=_string(record, "label_id", default_id), prompt=_messages(record.get("prompt"), "prompt"),
        responses=_strings(record.get("responses"), "responses"), ranks=_ints(record.get("ranks"), "ranks"),
        source=_string(record, "source", "IMPORT"), annotator=_string(record, "annotator", annotator),
        strength=_strength(record, "strength"), rationale=_string(record, "rationale", ""),
        metadata=_metadata(record.get("metadata")), task_id=_string(record, "task_id", ""),
    )


def ranking_record(label: LabelIn) -> dict:
    """The K-way ranking record of a label: every key of RANKING_KEYS, in that order."""
    return {
        "label_id": label.label_id, "prompt": [m.as_dict() for m in label.prompt], "responses": label.responses,
        "ranks": label.ranks, "source": label.source, "annotator": label.annotator, "strength": label.strength,
        "rationale": label.rationale, "metadata": dict(sorted(label.metadata.items())), "task_id": label.task_id,
    }


# -- reading records -----------------------------------------------------------------------


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:24]


def _json_object(raw: bytes) -> dict | FormatError:
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return FormatError(f"not a JSON line: {exc}")
    return value if isinstance(value, dict) else FormatError("not a JSON object")


def _jsonl_records(path: Path) -> Iterator[_Record]:
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            raw = line.rstrip(b"\r\n")
            if raw.strip():
                yield _Record(f"line {number}", _digest(raw), _json_object(raw))


def _parquet_records(path: Path) -> Iterator[_Record]:
    try:
        with duckdb.connect() as con:
            cursor = con.execute("SELECT * FROM read_parquet(?, file_row_number = true) ORDER BY file_row_number", [str(path)])
            names = [d[0] for d in cursor.description]
            rows = cursor.fetchall()
    except duckdb.Error as exc:
        yield _Record("file", "", FormatError(f"cannot read {path.name} as Parquet: {exc}"))
        return
    for row in rows:
        record = dict(zip(names, row))
        number = record.pop("file_row_number")
        canonical = json.dumps(record, ensure_ascii=False, sort_keys=True, separators=(",", ":"), default=str)
        yield _Record(f"row {number + 1}", _digest(canonical.encode()), record)


# -- import --------------------------------------------------------------------------------


def _existing(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    return path


def _parse(record: _Record, parse: Parse, fmt: str, annotator: str) -> LabelIn | FormatError:
    if isinstance(record.data, FormatError):
        return record.data
    try:
        return parse(record.data, f"{fmt}-{record.digest}", annotator)
    except FormatError as exc:
        return exc


def _import(store: Store, records: Iterable[_Record], parse: Parse, fmt: str, annotator: str) -> tuple[Counter, list[str]]:
    """Parse every record, ingest the labels in batches; counts per status and the reasons."""
    reasons: list[str] = []
    parsed: list[tuple[str, LabelIn]] = []
    for record in records:
        label = _parse(record, parse, fmt, annotator)
        if isinstance(label, FormatError):
            reasons.append(f"{record.where}: {label}")
        else:
            parsed.append((record.where, label))
    counts: Counter = Counter({"REJECTED": len(reasons)})
    for begin in range(0, len(parsed), BATCH):
        batch = parsed[begin : begin + BATCH]
        outcomes = store.ingest([label for _, label in batch], origin="dataset")
        for i, ((where, _), outcome) in enumerate(zip(batch, outcomes)):
            counts[outcome.status] += 1
            if outcome.status in ("REJECTED", "CONFLICT"):
                reasons.append(f"{where}: {outcome.label_id}: {outcome.reason.removeprefix(f'labels[{i}].')}")
    return counts, reasons


def import_trl(store: Store, path: Path, annotator: str = "trl") -> tuple[Counter, list[str]]:
    """Import a TRL conversational preference JSONL file (explicit or implicit prompt)."""
    return _import(store, _jsonl_records(_existing(path)), trl_label, "trl", annotator)


def import_ranking(store: Store, path: Path, annotator: str = "ranking") -> tuple[Counter, list[str]]:
    """Import a K-way ranking JSONL file."""
    return _import(store, _jsonl_records(_existing(path)), ranking_label, "ranking", annotator)


def import_parquet(store: Store, path: Path, annotator: str = "parquet") -> tuple[Counter, list[str]]:
    """Import a Parquet file with the K-way ranking columns."""
    return _import(store, _parquet_records(_existing(path)), ranking_label, "parquet", annotator)


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
    records = [trl_record(p) for p in store.pairs(snapshot)]
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

_IMPORTERS = {"hh": import_hh, "trl": import_trl, "ranking": import_ranking, "parquet": import_parquet}
_EXPORTERS = {"hh": export_hh, "trl": export_trl, "ranking": export_ranking, "parquet": export_parquet}


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise InvalidArgument("format", f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")


def import_file(store: Store, path: Path | str, fmt: str, annotator: str | None = None) -> tuple[Counter, list[str]]:
    """Import a file of format `fmt`; annotator None means the format's default
    ("hh-rlhf" for hh, else the format name). Returns counts per status and the reasons."""
    _check_format(fmt)
    importer = _IMPORTERS[fmt]
    return importer(store, Path(path)) if annotator is None else importer(store, Path(path), annotator)


def export_file(store: Store, path: Path | str, fmt: str, snapshot_id: str | None = None) -> tuple[int, str]:
    """Export a snapshot (a new one unless snapshot_id is given) as `fmt`; returns
    (records written, snapshot id)."""
    _check_format(fmt)
    return _EXPORTERS[fmt](store, Path(path), snapshot_id)
