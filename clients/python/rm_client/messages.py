"""Messages to and from rm.v1 protos: the one conversion every client in the repository uses.

A message may be any object with `role` and `content` attributes (rm_service's `Message`), or a
mapping with those keys (the OpenAI / TRL chat shape). `content` is a string, or a list of
content parts of which only text parts (`{"type": "text", "text": ...}`) can be scored.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from rm_client.api.v1 import common_pb2, preference_pb2, reward_pb2


def text_of(content, where: str = "content") -> str:
    """A message's text: a string as it is, text parts joined; anything else is a ValueError."""
    if isinstance(content, str):
        return content
    if isinstance(content, Iterable) and not isinstance(content, (bytes, Mapping)):
        texts = []
        for i, part in enumerate(content):
            if (
                not isinstance(part, Mapping)
                or part.get("type", "text") != "text"
                or not isinstance(part.get("text"), str)
            ):
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise ValueError(f"{where}[{i}]: only text content parts can be scored, got {kind!r}")
            texts.append(part["text"])
        return "".join(texts)
    raise ValueError(f"{where}: expected a string or a list of text parts, got {type(content).__name__}")


def role_and_text(message, where: str = "message") -> tuple[str, str]:
    if isinstance(message, Mapping):
        if "role" not in message or "content" not in message:
            raise ValueError(f"{where}: a message needs 'role' and 'content', got keys {sorted(message)}")
        role, content = message["role"], message["content"]
    elif hasattr(message, "role") and hasattr(message, "content"):
        role, content = message.role, message.content
    else:
        raise ValueError(f"{where}: expected a message (role and content), got {type(message).__name__}")
    if not isinstance(role, str):
        raise ValueError(f"{where}.role: expected a string, got {type(role).__name__}")
    return role, text_of(content, f"{where}.content")


def to_proto(messages, where: str = "prompt") -> list[common_pb2.Message]:
    """rm.v1 Messages of a conversation (any iterable of messages)."""
    out = []
    for i, m in enumerate(messages):
        role, text = role_and_text(m, f"{where}[{i}]")
        out.append(common_pb2.Message(role=role, content=text))
    return out


def pair_label(prompt, chosen: str, rejected: str, **fields) -> preference_pb2.Label:
    """An rm.v1 Label of one preference pair: `chosen` ranked over `rejected` after the `prompt` turns,
    a HUMAN label unless `fields` (label_id, annotator, source, ...) say otherwise."""
    fields.setdefault("source", preference_pb2.HUMAN)
    return preference_pb2.Label(prompt=to_proto(prompt), responses=[chosen, rejected], ranks=[0, 1], **fields)


def from_proto(messages: Iterable[common_pb2.Message]) -> list[dict[str, str]]:
    """Plain {role, content} dicts of rm.v1 Messages."""
    return [{"role": m.role, "content": m.content} for m in messages]


def score_item(prompt, completion: str, item_id: str = "") -> reward_pb2.ScoreItem:
    return reward_pb2.ScoreItem(id=item_id, prompt=to_proto(prompt), completion=completion)
