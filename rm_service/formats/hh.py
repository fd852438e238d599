"""The HH-RLHF text format (Anthropic's hh-rlhf): one JSON object a line,
`{"chosen": str, "rejected": str}`, each a whole conversation:

    "\\n\\nHuman: <turn>\\n\\nAssistant: <turn> ... \\n\\nAssistant: <final turn>"

The two share every turn but the final assistant turn. A pair maps to prompt = every turn
before the final one (roles user/assistant), chosen/rejected = the two final turns.
Turn text is kept byte for byte, so export(import(file)) reproduces each line's text.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from rm_service.conversation import HHFormatError, Message, parse_conversation, render_conversation
from rm_service.formats.records import FormatError, jsonl_records

__all__ = ["HHFormatError", "HHPair", "parse_conversation", "parse_pair", "read_pairs", "render_conversation", "render_pair"]


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
