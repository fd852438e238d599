"""Messages, conversations and their content-addressed ids.

A preference item is (prompt, completion): the prompt holds every turn before the
completion (multi-turn chats are first class), the completion is the final assistant turn.
HH-RLHF's transcript text is the one text form of a conversation kept here (`parse_conversation`,
`render_conversation`), so that readers of prompts outside the service (the policy trainer) use
the same rules as the hh format (rm_service.formats.hh).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass

from rm_service.errors import InvalidArgument

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True, slots=True)
class Message:
    role: str
    content: str

    def as_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


def validate_messages(messages: list[Message], field: str, max_chars: int | None = None) -> None:
    """A prompt: valid turns, ending with a user or system turn (the completion comes next)."""
    validate_turns(messages, field, max_chars)
    if messages[-1].role == "assistant":
        raise InvalidArgument(f"{field}[{len(messages) - 1}].role", "the prompt must end with a user or system turn")


def validate_turns(messages: list[Message], field: str, max_chars: int | None = None) -> None:
    """Raise InvalidArgument naming `field[i].role|content` for the first bad message."""
    if not messages:
        raise InvalidArgument(field, "must hold at least one message")
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise InvalidArgument(
                f"{field}[{i}].role", f"unknown role {_shown(m.role)}; expected one of {', '.join(ROLES)}"
            )
        validate_text(m.content, f"{field}[{i}].content", max_chars)


def scored_turns(messages: list[Message]) -> list[int]:
    """Indexes of the assistant turns a reward model scores in a whole conversation: every
    assistant message after the first user message (its prompt is every message before it).
    ScoreTurns scores these; per-turn thumbs may name only these; a session's value sums them."""
    first_user = next((i for i, m in enumerate(messages) if m.role == "user"), len(messages))
    return [i for i, m in enumerate(messages) if m.role == "assistant" and i > first_user]


def validate_text(text: str, field: str, max_chars: int | None = None, required: bool = True) -> None:
    """Non-empty (unless not required), at most max_chars characters, valid Unicode (no lone
    surrogates, which JSON escapes can carry and UTF-8 cannot encode). O(len(text))."""
    if max_chars is not None and len(text) > max_chars:
        raise InvalidArgument(field, f"is {len(text)} characters; the limit is {max_chars}")
    if required and not text.strip():
        raise InvalidArgument(field, "must not be empty")
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidArgument(
                field, f"holds a lone surrogate at character {exc.start}; text must be valid Unicode"
            ) from None


def validate_finite(value: float, field: str, minimum: float | None = None, maximum: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgument(field, f"must be a number, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):  # an int is finite, however large
        raise InvalidArgument(field, f"must be finite, got {value}")
    if minimum is not None and value < minimum:
        raise InvalidArgument(field, f"must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise InvalidArgument(field, f"must be <= {maximum}, got {value}")


def _shown(value: str, limit: int = 40) -> str:
    """repr of a client's string, cut to `limit` characters: error messages stay short."""
    return repr(value if len(value) <= limit else value[:limit] + "...")


def canonical_json(messages: list[Message]) -> str:
    """The canonical serialisation that ids hash: compact JSON of [{role, content}, ...]."""
    return json.dumps([m.as_dict() for m in messages], ensure_ascii=False, separators=(",", ":"))


def conversation_id(messages: list[Message]) -> str:
    """Content address of a prompt: the same turns always give the same id."""
    return hashlib.sha256(canonical_json(messages).encode()).hexdigest()[:32]


def completion_id(conv_id: str, text: str) -> str:
    """Content address of a completion within its conversation."""
    return hashlib.sha256(f"{conv_id}\x00{text}".encode()).hexdigest()[:32]


def messages_from_json(text: str) -> list[Message]:
    return [Message(d["role"], d["content"]) for d in json.loads(text)]


# -- HH-RLHF transcript text: "\n\nHuman: <turn>\n\nAssistant: <turn> ..." --------------

_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")
_HH_ROLE = {"Human": "user", "Assistant": "assistant"}
_HH_NAME = {"user": "Human", "assistant": "Assistant"}


class HHFormatError(ValueError):
    pass


def parse_conversation(text: str) -> list[Message]:
    """Split HH text into messages; raises HHFormatError if it is not in the format."""
    parts = _HH_TURN.split(text)
    if parts[0] != "" or len(parts) < 3:
        raise HHFormatError("does not start with '\\n\\nHuman: '")
    # parts = ["", role, content, role, content, ...]
    return [Message(_HH_ROLE[parts[i]], parts[i + 1]) for i in range(1, len(parts), 2)]


def render_conversation(messages: list[Message]) -> str:
    """HH text of user and assistant messages, turn text byte for byte."""
    return "".join(f"\n\n{_HH_NAME[m.role]}: {m.content}" for m in messages)
