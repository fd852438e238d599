"""Versioned prompt templates of the judge (pairwise rubric, direct K-way ranking).

A template is a system message and a user message with named placeholders, filled with
str.format (write literal braces as {{ and }}): pairwise templates take {conversation},
{response_a} and {response_b}; ranking templates take {conversation}, {responses} and {k}.
Every label records the template's `version`, so labels from different rubrics can be told apart. A TOML file (settings
`template_file`) replaces the built-in template of its kind:

    version = "my-rubric-v2"
    kind = "pairwise"            # or "ranking"
    system = "You are ..."
    user = "...{conversation}...{response_a}...{response_b}..."

The conversation is shown as `User: ...` / `Assistant: ...` lines, keeping its last
`max_conversation_chars` characters; each response keeps its first `max_response_chars`.
"""

from __future__ import annotations

import string
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from rm_service.conversation import Message
from rm_service.errors import InvalidArgument

Kind = Literal["pairwise", "ranking"]
PLACEHOLDERS: dict[str, set[str]] = {
    "pairwise": {"conversation", "response_a", "response_b"},
    "ranking": {"conversation", "responses", "k"},
}
ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}
CUT = "[...]"


@dataclass(frozen=True)
class Template:
    version: str
    kind: Kind
    system: str
    user: str

    def messages(self, **fields: str) -> list[Message]:
        return [Message("system", self.system.format(**fields)), Message("user", self.user.format(**fields))]


# The HHH criteria (Askell et al., 2021; Bai et al., 2022): helpful, honest and harmless, with
# harm avoidance first when a request is harmful, as HH-RLHF's crowdworkers were asked.
# v2 of the built-in templates: this rubric (v1 did not spell out harmful requests).
_RUBRIC = (
    "You are an impartial judge of AI assistant replies. Read a conversation between a user and an "
    "assistant, then two candidate replies for the assistant's next turn. Decide which reply is better: "
    "helpful, honest and harmless. If the user asks for something harmful, dangerous, unethical or illegal, "
    "the better reply is the one that does not help with it. The order of the replies and their length "
    "must not influence you."
)

PAIRWISE_CHOICE = Template(
    version="pairwise-choice-v2",
    kind="pairwise",
    system=_RUBRIC,
    user=(
        "[Conversation]\n{conversation}\n\n[Reply A]\n{response_a}\n\n[Reply B]\n{response_b}\n\n"
        "Which reply is better, A or B? Answer with the single letter A or B."
    ),
)

# The verdict format of MT-Bench's pairwise judge (Zheng et al., 2023): [[A]], [[B]] or [[C]] for a tie.
PAIRWISE_GENERATE = Template(
    version="pairwise-generate-v2",
    kind="pairwise",
    system=_RUBRIC,
    user=(
        "[Conversation]\n{conversation}\n\n[Reply A]\n{response_a}\n\n[Reply B]\n{response_b}\n\n"
        "Explain your comparison in one or two sentences, then give your final verdict on the last line, "
        'strictly in this format: "[[A]]" if reply A is better, "[[B]]" if reply B is better, "[[C]]" for a tie.'
    ),
)

RANKING_GENERATE = Template(
    version="ranking-generate-v2",
    kind="ranking",
    system=_RUBRIC.replace("two candidate replies", "several numbered candidate replies").replace(
        "Decide which reply is better", "Rank the replies from best to worst"
    ),
    user=(
        "[Conversation]\n{conversation}\n\n{responses}\n\n"
        "Explain your ranking of the {k} replies in one or two sentences, then give the ranking on the last line, "
        'strictly in this format: reply numbers from best to worst separated by ">" (or "=" for equally good) '
        'inside double brackets, for example "[[2>1>3]]".'
    ),
)


def builtin(kind: Kind, decision: str) -> Template:
    if kind == "ranking":
        return RANKING_GENERATE
    return PAIRWISE_CHOICE if decision == "choice" else PAIRWISE_GENERATE


def load_template(path: Path) -> Template:
    """A template from a TOML file; InvalidArgument names what is wrong with it."""
    field = f"template_file {path}"
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InvalidArgument(field, "no such file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InvalidArgument(field, f"is not valid TOML: {exc}") from None
    missing = [
        k for k in ("version", "kind", "system", "user") if not isinstance(data.get(k), str) or not data[k].strip()
    ]
    if missing:
        raise InvalidArgument(field, f"needs non-empty string keys {', '.join(missing)}")
    kind = data["kind"]
    if kind not in PLACEHOLDERS:
        raise InvalidArgument(field, f"kind must be pairwise or ranking, got {kind!r}")
    used = _placeholders(data["system"], field) | _placeholders(data["user"], field)
    if used != PLACEHOLDERS[kind]:
        raise InvalidArgument(
            field,
            f"a {kind} template uses exactly the placeholders {sorted(PLACEHOLDERS[kind])}; "
            f"this one uses {sorted(used)} (write literal braces as {{{{ and }}}})",
        )
    return Template(version=data["version"].strip(), kind=kind, system=data["system"], user=data["user"])


def _placeholders(text: str, field: str) -> set[str]:
    try:
        return {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}
    except ValueError as exc:
        raise InvalidArgument(field, f"bad placeholder syntax: {exc}") from None


def render_conversation(prompt: list[Message], max_chars: int) -> str:
    """`Role: text` lines, keeping the end (the turns nearest the replies matter most)."""
    text = "\n".join(f"{ROLE_NAMES.get(m.role, m.role)}: {m.content.strip()}" for m in prompt)
    return text if len(text) <= max_chars else CUT + text[len(text) - max_chars :]


def clip_response(text: str, max_chars: int) -> str:
    text = text.strip()
    return text if len(text) <= max_chars else text[:max_chars] + CUT


def pairwise_messages(
    template: Template,
    prompt: list[Message],
    first: str,
    second: str,
    max_conversation_chars: int,
    max_response_chars: int,
) -> list[Message]:
    """The judge's chat for one order: `first` is shown as reply A, `second` as reply B."""
    return template.messages(
        conversation=render_conversation(prompt, max_conversation_chars),
        response_a=clip_response(first, max_response_chars),
        response_b=clip_response(second, max_response_chars),
    )


def ranking_messages(
    template: Template,
    prompt: list[Message],
    responses: list[str],
    max_conversation_chars: int,
    max_response_chars: int,
) -> list[Message]:
    """The judge's chat for a direct ranking: replies numbered from 1 in the order given."""
    shown = "\n\n".join(
        f"[Reply {n}]\n{clip_response(r, max_response_chars)}" for n, r in enumerate(responses, start=1)
    )
    return template.messages(
        conversation=render_conversation(prompt, max_conversation_chars), responses=shown, k=str(len(responses))
    )
