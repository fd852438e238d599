"""TRL's preference dataset format, as TRL defines it (its dataset-formats guide and
`trl.data_utils`), one JSON object a line.

Import accepts every preference shape TRL accepts:

- standard: `prompt`, `chosen` and `rejected` are strings. The prompt is stored as one user
  message; the completions are kept exactly (TRL's " blue." keeps its leading space).
- conversational: they are lists of messages `{"role": ..., "content": ...}`. Content may be
  a string or a list of content parts; the text parts (`{"type": "text", "text": ...}`) are
  joined without a separator, as chat templates render them, and a part of any other type
  (an image) rejects the line. Extra message keys (`name`, `tool_calls`, ...) are ignored.
- explicit prompt: a `prompt` of the same kind as `chosen` (both strings or both lists).
- implicit prompt: no `prompt`, or one of the other kind (TRL then ignores it): the prompt is
  the longest common prefix of `chosen` and `rejected`, of messages for conversations, of
  characters for strings, where a space just before the first difference goes with the
  completions (as TRL's `extract_prompt` splits them).

For conversations, prompt + chosen and prompt + rejected must then differ only in one final
assistant message each; the turns they share become the prompt (so a multi-message `chosen`
whose leading turns are shared is accepted too). Optional keys: `label_id`, `annotator`,
`source` (HUMAN | JUDGE | IMPORT), and `strength` or `margin` (a number >= 0, not both). Every
other key is an extra column, kept as label metadata: strings as they are, other values as
compact JSON. Metadata also gets `"format": "trl"` (which takes precedence over a column of
that name). A line becomes a label with responses [chosen, rejected] and ranks [0, 1].

Export writes the explicit conversational form, one line per pair of a snapshot ("all"
policy: every two responses of a label with different ranks, the better one chosen; ties
give no pair). `margin` is on every line or on none, so TRL's RewardTrainer can load any
export: when some pair's label has a strength, a pair without one gets margin 0.0, which is
the loss without a margin.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from rm_service.conversation import Message
from rm_service.formats.ingest import import_records
from rm_service.formats.records import FormatError, Record, jsonl_records, strength, string, write_jsonl
from rm_service.store.db import Pair, Snapshot, Store
from rm_service.store.labels import LabelIn

KEYS = ("prompt", "chosen", "rejected", "label_id", "annotator", "source", "strength", "margin")


def trl_label(record: Record, default_id: str, annotator: str) -> LabelIn:
    """The label of one TRL record of any shape above; raises FormatError."""
    data = record.fields
    prompt, chosen, rejected = trl_turns(data)
    if "strength" in data and "margin" in data:
        raise FormatError("give strength or margin, not both")
    extra = {
        key: value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, separators=(",", ":"))
        for key, value in data.items()
        if key not in KEYS
    }
    return LabelIn(
        label_id=string(data, "label_id", default_id),
        prompt=prompt,
        responses=[chosen, rejected],
        ranks=[0, 1],
        source=string(data, "source", "IMPORT"),
        annotator=string(data, "annotator", annotator),
        strength=strength(data, "margin" if "margin" in data else "strength"),
        metadata={**extra, "format": "trl"},
    )


def trl_turns(data: dict) -> tuple[list[Message], str, str]:
    """(prompt, chosen text, rejected text) of a TRL record."""
    for key in ("chosen", "rejected"):
        if not isinstance(data.get(key), (str, list)):
            raise FormatError(
                f"{key} must be a list of messages (conversational) or a string (standard)"
                + ("; it is missing" if data.get(key) is None else "")
            )
    chosen, rejected, prompt = data["chosen"], data["rejected"], data.get("prompt")
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise FormatError("chosen and rejected must both be strings or both be lists of messages")
    conversational = isinstance(chosen, list)
    explicit = prompt is not None and isinstance(prompt, list) == conversational
    if not conversational:
        return _standard(prompt if explicit else None, chosen, rejected)
    chosen_turns, rejected_turns = _messages(chosen, "chosen"), _messages(rejected, "rejected")
    if explicit:
        shared = _messages(prompt, "prompt")
        chosen_turns, rejected_turns = shared + chosen_turns, shared + rejected_turns
    return _split_conversations(chosen_turns, rejected_turns)


def _standard(prompt: str | None, chosen: str, rejected: str) -> tuple[list[Message], str, str]:
    if prompt is None:  # implicit: the longest common prefix of characters
        split = 0
        for a, b in zip(chosen, rejected, strict=False):
            if a != b:
                break
            split += 1
        if split and chosen[split - 1] == " ":
            split -= 1
        prompt, chosen, rejected = chosen[:split], chosen[split:], rejected[split:]
        if not prompt.strip():
            raise FormatError("chosen and rejected share no prompt (implicit prompt: their common prefix is empty)")
    return [Message("user", prompt)], chosen, rejected


def _split_conversations(chosen: list[Message], rejected: list[Message]) -> tuple[list[Message], str, str]:
    shared = 0
    for a, b in zip(chosen, rejected, strict=False):
        if a != b:
            break
        shared += 1
    if shared == len(chosen) == len(rejected) > 0:
        shared -= 1  # the same conversation twice: the store rejects the identical responses
    for name, turns in (("chosen", chosen), ("rejected", rejected)):
        if not turns or turns[-1].role != "assistant":
            raise FormatError(f"the last message of {name} must be an assistant message")
    if len(chosen) - shared != 1 or len(rejected) - shared != 1:
        raise FormatError(
            "chosen and rejected must share every message but the last (the prompt), then differ in one assistant "
            "message"
        )
    return chosen[:shared], chosen[-1].content, rejected[-1].content


def _messages(value: object, field: str) -> list[Message]:
    if not isinstance(value, list):
        raise FormatError(f"{field} must be a list of messages")
    return [_message(m, f"{field}[{i}]") for i, m in enumerate(value)]


def _message(value: object, field: str) -> Message:
    """A TRL message: role and content (a string or text parts); other keys are ignored."""
    if not isinstance(value, dict) or not isinstance(value.get("role"), str):
        raise FormatError(f"{field} must be an object with a string 'role' and a 'content'")
    content = value.get("content")
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                shown = f"a {str(kind)[:20]!r} part" if isinstance(kind, str) else "not a text part"
                raise FormatError(
                    f"{field}.content[{j}] is {shown}; only text parts ({{'type': 'text', 'text': ...}}) can be stored"
                )
            texts.append(part["text"])
        content = "".join(texts)
    if not isinstance(content, str):
        raise FormatError(f"{field}.content must be a string or a list of text parts")
    return Message(value["role"], content)


def trl_records(pairs: list[Pair]) -> list[dict]:
    """Explicit-prompt conversational records of pairs, with `margin` on all or none."""
    with_margin = any(p.strength is not None for p in pairs)
    records = []
    for p in pairs:
        record: dict = {
            "prompt": [m.as_dict() for m in p.prompt],
            "chosen": [Message("assistant", p.chosen).as_dict()],
            "rejected": [Message("assistant", p.rejected).as_dict()],
        }
        if with_margin:
            record["margin"] = p.strength if p.strength is not None else 0.0
        records.append(record)
    return records


def import_labels(store: Store, path: Path, annotator: str) -> tuple[Counter, list[str]]:
    """Import a TRL preference JSONL file (any shape above)."""
    return import_records(store, jsonl_records(path), trl_label, "trl", annotator)


def export_labels(store: Store, out: Path, snapshot: Snapshot) -> int:
    """Write a snapshot's pairs as explicit-prompt conversational TRL JSONL; returns the lines."""
    records = trl_records(store.pairs(snapshot))
    write_jsonl(out, records)
    return len(records)
