"""Reading preference files record by record: bytes in, a parsed record or a reason out.

Every importer reads its file through `jsonl_records` (or, for Parquet,
rm_service.formats.parquet.parquet_records, which yields the same Records), so a bad record
is one reason ("line N: ...", "row N: ...") and never an exception:

- JSONL is read as bytes, one line at a time. A line longer than MAX_LINE_BYTES (without its
  line ending) is rejected without being held in memory; a line that is not UTF-8, not JSON,
  or JSON but not an object (an array, a string, a number) is rejected with the reason.
  Blank lines are skipped; a UTF-8 byte-order mark at the start of the file is ignored.
- Parquet is read by DuckDB (an in-memory connection); a file DuckDB cannot read is one
  reason, "file: ...".

`write_jsonl` writes what the JSONL exporters produce.

The field helpers below turn JSON values into the types a LabelIn holds and raise
FormatError naming the field. Value ranges (ranks < K, finite bounded strengths, K, text
sizes) are the store's to check (rm_service.store.labels.validate_label), and it checks them
without allocating in proportion to any value read.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from rm_service.conversation import Message

MAX_LINE_BYTES = 8 * 1024 * 1024
_BOM = b"\xef\xbb\xbf"
_SKIP_CHUNK = 1024 * 1024


class FormatError(ValueError):
    """A record that is not in its file's format."""


@dataclass(frozen=True)
class Record:
    unit: str  # "line" or "row"; "file" for a file that cannot be read at all
    number: int  # 1-based, in file order
    digest: str  # sha256 of the record, first 24 hex digits
    data: dict | FormatError

    @property
    def where(self) -> str:
        return "file" if self.unit == "file" else f"{self.unit} {self.number}"

    @property
    def fields(self) -> dict:
        """The record's object; raises its FormatError when it could not be read as one."""
        if isinstance(self.data, FormatError):
            raise self.data
        return self.data


def input_file(path: Path) -> Path:
    """`path` if it is a readable file; else an OSError whose message is one clear line."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory, not a file")
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:  # unreadable, or not something one can read (a socket)
        raise type(exc)(f"cannot read {path}: {exc.strerror or exc}") from None
    return path


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:24]


# -- JSONL ---------------------------------------------------------------------------------


def jsonl_records(path: Path, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[Record]:
    """One Record per non-blank line; its digest hashes the line's bytes without line ending."""
    with open(input_file(path), "rb") as f:
        number = 0
        while True:
            line = f.readline(max_line_bytes + 1)
            if not line:
                return
            number += 1
            if len(line) > max_line_bytes and not line.endswith(b"\n"):
                while line and not line.endswith(b"\n"):  # skip the rest without keeping it
                    line = f.readline(_SKIP_CHUNK)
                yield Record("line", number, "", FormatError(f"longer than {max_line_bytes} bytes (the line limit)"))
                continue
            raw = line.rstrip(b"\r\n")
            if number == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM) :]
            if raw.strip():
                yield Record("line", number, digest(raw), json_object(raw))


_JSON_TYPES = {
    list: "an array",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "a boolean",
    type(None): "null",
}


def json_object(raw: bytes) -> dict | FormatError:
    """The JSON object of one line, or the reason it is not one."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return FormatError(f"not UTF-8: byte 0x{raw[exc.start]:02x} at byte {exc.start + 1} of the line")
    try:
        value = json.loads(text)
    except RecursionError:
        return FormatError("not a JSON line: nested too deeply")
    except ValueError as exc:  # JSONDecodeError, or an integer of more than 4300 digits
        return FormatError(f"not a JSON line: {exc}")
    if not isinstance(value, dict):
        return FormatError(f"not a JSON object: the line is {_JSON_TYPES.get(type(value), type(value).__name__)}")
    return value


def write_jsonl(out: Path, records: list[dict]) -> None:
    """One compact JSON object a line, UTF-8 (not escaped); the parent directory is created."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


# -- field parsing -------------------------------------------------------------------------


def known_keys(data: dict, keys: tuple[str, ...]) -> dict:
    """`data` when it has no key outside `keys`; FormatError naming (a few of) the others."""
    unknown = sorted(set(data) - set(keys))
    if unknown:
        raise FormatError(f"unknown keys {[k[:40] for k in unknown[:5]]}; expected {', '.join(keys)}")
    return data


def message(value: object, field: str) -> Message:
    if (
        not isinstance(value, dict)
        or set(value) != {"role", "content"}
        or not all(isinstance(v, str) for v in value.values())
    ):
        raise FormatError(f"{field} must be an object with exactly the string keys 'role' and 'content'")
    return Message(value["role"], value["content"])


def messages(value: object, field: str) -> list[Message]:
    if not isinstance(value, list):
        raise FormatError(f"{field} must be a list of messages")
    return [message(m, f"{field}[{i}]") for i, m in enumerate(value)]


def string(record: dict, key: str, default: str) -> str:
    value = record.get(key)
    if value is None:
        return default
    if not isinstance(value, str):
        raise FormatError(f"{key} must be a string")
    return value


def strength(record: dict, key: str) -> float | None:
    value = record.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FormatError(f"{key} must be a number or null")
    try:
        return float(value)
    except OverflowError:  # only an int can be too large for a float
        raise FormatError(f"{key} is out of range: an integer of {int(value).bit_length()} bits") from None


def strings(value: object, field: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise FormatError(f"{field} must be a list of strings")
    return value


def ints(value: object, field: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise FormatError(f"{field} must be a list of integers")
    return value


def metadata(value: object) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise FormatError("metadata must map strings to strings")
    return value
