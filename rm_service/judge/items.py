"""What the judge labels: a prompt and K >= 2 responses, from a leased task or a JSONL file.

A JSONL file holds one item a line, in either shape:

    {"id": "optional-key", "prompt": [{"role": "user", "content": "..."}, ...], "completions": ["...", "..."]}
    {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "..."}        (an HH-RLHF pair)

`prompt` may also be a plain string (one user turn) and `completions` may be called
`responses`. The whole file is checked before anything is judged; a bad line is an
InvalidArgument naming the file and line.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from rm_service.api.v1 import preference_pb2
from rm_service.conversation import Message, canonical_json, validate_messages, validate_text
from rm_service.errors import InvalidArgument
from rm_service.formats.hh import HHFormatError, parse_pair


@dataclass(frozen=True)
class JudgeItem:
    key: str  # task id, or the file item's id: what the label's id is derived from
    prompt: list[Message]
    responses: list[str]  # empty for a session (then `prompt` is the whole played conversation)
    task_id: str = ""
    kind: str = "ranking"  # ranking | session


def item_from_task(task) -> JudgeItem:
    """A leased Task (proto) as an item; its label will close the task."""
    session = task.kind == preference_pb2.SESSION
    return JudgeItem(
        key=task.task_id,
        prompt=[Message(m.role, m.content) for m in (task.conversation if session else task.prompt)],
        responses=list(task.completions),
        task_id=task.task_id,
        kind="session" if session else "ranking",
    )


def item_key(prompt: list[Message], responses: list[str]) -> str:
    blob = json.dumps([canonical_json(prompt), responses], ensure_ascii=False)
    return "item-" + hashlib.sha256(blob.encode()).hexdigest()[:24]


def read_items(path: Path, max_responses: int = 16) -> list[JudgeItem]:
    """Every item of a JSONL file, validated; raises on the first bad line."""
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    items = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                items.append(_item(line, f"{path}:{number}", max_responses))
    if not items:
        raise InvalidArgument(str(path), "holds no items")
    return items


def _item(line: str, where: str, max_responses: int) -> JudgeItem:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InvalidArgument(where, f"not JSON: {exc}") from None
    if not isinstance(record, dict):
        raise InvalidArgument(where, "each line must be a JSON object")
    if "chosen" in record and "rejected" in record:
        try:
            pair = parse_pair(record)
        except HHFormatError as exc:
            raise InvalidArgument(where, f"not an HH-RLHF pair: {exc}") from None
        prompt, responses = pair.prompt, [pair.chosen, pair.rejected]
    else:
        prompt = _prompt(record.get("prompt"), where)
        given = record.get("completions", record.get("responses"))
        if not isinstance(given, list) or not all(isinstance(r, str) for r in given):
            raise InvalidArgument(f"{where}.completions", "must be a list of strings")
        responses = given
    validate_messages(prompt, f"{where}.prompt")
    if not 2 <= len(responses) <= max_responses:
        raise InvalidArgument(f"{where}.completions", f"needs 2 to {max_responses} responses, got {len(responses)}")
    for i, text in enumerate(responses):
        validate_text(text, f"{where}.completions[{i}]")
    if len(set(responses)) != len(responses):
        raise InvalidArgument(f"{where}.completions", "responses must all be different")
    key = record.get("id")
    if key is not None and (not isinstance(key, str) or not key.strip()):
        raise InvalidArgument(f"{where}.id", "must be a non-empty string")
    return JudgeItem(key=key or item_key(prompt, responses), prompt=prompt, responses=responses)


def _prompt(value, where: str) -> list[Message]:
    if isinstance(value, str):
        return [Message("user", value)]
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise InvalidArgument(f"{where}.prompt", "must be a string or a list of {role, content} objects")
    try:
        return [Message(str(m["role"]), str(m["content"])) for m in value]
    except KeyError as exc:
        raise InvalidArgument(f"{where}.prompt", f"a message lacks {exc}") from None
