"""Conversations that arrive as rendered text: what a policy's chat template wrote, decoded.

OpenRLHF's `query` (and a vLLM `input`) is the prompt and the response as one string: the
policy's chat template's output, decoded with its special tokens. rm-service parses it back
into messages and scores them under the served version's own formatting contract, the path
gRPC Score takes, instead of tokenizing the policy's bytes as they are:

- the reward model then sees exactly what it was trained and evaluated on (its own template,
  EOS policy, truncation that keeps the end), whichever template the policy used to render;
- a string rendered from messages M scores exactly as Score(prompt = M[:-1], completion =
  M[-1].content) does: the same reward, the same version (tests/test_http_reward.py);
- encoder reward models work too: they have no chat template to match the text against.

The contract (ChatML, as SmolLM2, Qwen and the chat template of rm-service's tiny test models
write it): turns `<|im_start|>ROLE\\nCONTENT<|im_end|>`, separated by whitespace, ROLE one of
system, user, assistant; the last turn is the assistant's reply, which may lack its
`<|im_end|>` (a generation cut at its token limit). Text before the first `<|im_start|>` is
dropped (a BOS token, or what is left of a prompt the trainer cut from the left), and so are
the tokenizer's other special tokens (EOS, padding) between and after turns. A content that
itself holds `<|im_start|>` or `<|im_end|>` cannot be told apart from a turn boundary: the
markers are special tokens, and a policy that emits one ends its turn there. Anything else
(no ChatML marker, an unclosed earlier turn, text between turns, a last turn that is not the
assistant's) is refused with 400 naming the field: rm-service does not guess at a template.

The other common templates follow the same contract with their own markers (TEMPLATES):
- llama3: `<|start_header_id|>ROLE<|end_header_id|>\n\nCONTENT<|eot_id|>` (Llama 3, 3.1, 3.2, 3.3;
  3.1's default system turn with its knowledge date is a system message like any other);
- gemma: `<start_of_turn>ROLE\nCONTENT<end_of_turn>`, role `model` read as assistant (Gemma 1-3;
  Gemma's template folds a system message into the first user turn, and so it stays);
- mistral: `[INST] USER [/INST] REPLY</s>` turns, `[SYSTEM_PROMPT]...[/SYSTEM_PROMPT]` as a system
  message (Mistral 7B v0.1-v0.3, Mixtral, Mistral Small/Nemo, with or without the spaces);
  contents are stripped of the spaces the template adds around them.
`http_chat_template` (RM_SERVE_HTTP_CHAT_TEMPLATE) picks one; `auto` (the default) takes the
template whose turn marker comes first in the text. Callers with yet another template send
messages (`/classify` or `/pooling` with `messages`, or gRPC).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from rm_service.conversation import Message
from rm_service.errors import InvalidArgument

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
INST, INST_END, SYS, SYS_END, EOS = "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "</s>"


@dataclass(frozen=True)
class Template:
    """A template whose turns are START ROLE ROLE_END CONTENT END."""

    name: str
    start: str
    role_end: str
    end: str
    roles: dict[str, str] = field(default_factory=dict)  # the template's role names -> ours

    def markers(self) -> tuple[str, ...]:
        return (self.start, self.end, self.role_end) if self.role_end.strip() else (self.start, self.end)


CHATML = Template("chatml", IM_START, "\n", IM_END)
LLAMA3 = Template("llama3", "<|start_header_id|>", "<|end_header_id|>\n\n", "<|eot_id|>")
GEMMA = Template("gemma", "<start_of_turn>", "\n", "<end_of_turn>", {"model": "assistant"})
TEMPLATES = ("auto", "chatml", "llama3", "gemma", "mistral")
_MARKED = {t.name: t for t in (CHATML, LLAMA3, GEMMA)}
# What starts a conversation in each template: `auto` takes the template whose mark comes first.
FIRST_MARKS = (
    ("chatml", IM_START),
    ("llama3", LLAMA3.start),
    ("gemma", GEMMA.start),
    ("mistral", INST),
    ("mistral", SYS),
)


def parse_rendered(
    text: str, field: str, ignorable: Iterable[str] = (), template: str = "auto"
) -> tuple[list[Message], str]:
    """(prompt messages, completion) of one rendered conversation in `template` (or, for auto,
    the template whose first turn marker comes first); InvalidArgument naming `field` otherwise."""
    if template == "auto":
        found = [(text.find(mark), name) for name, mark in FIRST_MARKS if mark in text]
        if not found:
            raise InvalidArgument(
                field,
                "is not a rendered conversation: no turn marker of ChatML (<|im_start|>), Llama 3 "
                "(<|start_header_id|>), Gemma (<start_of_turn>) or Mistral ([INST]). Send the conversation rendered "
                'with one of these chat templates, or as messages (POST /classify or /pooling with "messages")',
            )
        template = min(found)[1]
    if template == "mistral":
        return parse_mistral(text, field, ignorable)
    return _parse_marked(text, field, ignorable, _MARKED[template])


def parse_chatml(text: str, field: str, ignorable: Iterable[str] = ()) -> tuple[list[Message], str]:
    """(prompt messages, completion) of one ChatML conversation; InvalidArgument naming `field`
    when `text` does not follow the contract above. `ignorable`: special tokens (EOS, padding)
    that may stand between and after turns."""
    return _parse_marked(text, field, ignorable, CHATML)


def _parse_marked(text: str, field: str, ignorable: Iterable[str], t: Template) -> tuple[list[Message], str]:
    ignorable = sorted({x for x in ignorable if x and x not in t.markers()}, key=len, reverse=True)
    first = text.find(t.start)
    if first < 0:
        raise InvalidArgument(
            field,
            f"is not a {t.name} conversation: no {t.start} marker. Send the conversation rendered with a "
            f'{t.name} chat template, or as messages (POST /classify or /pooling with "messages")',
        )
    parts = text[first + len(t.start) :].split(t.start)
    turns = []
    for k, part in enumerate(parts):
        last = k == len(parts) - 1
        role, newline, rest = part.partition(t.role_end)
        if not newline:
            shown = t.role_end.replace("\n", "\\n")
            what = "a newline" if t.role_end == "\n" else shown
            raise InvalidArgument(field, f"turn {k}: the role must be followed by {what} ({t.start}ROLE{shown}...)")
        content, closed, tail = rest.partition(t.end)
        if closed:
            if _strip(tail, ignorable).strip():
                raise InvalidArgument(
                    field, f"turn {k}: text after {t.end} that belongs to no turn: {_shown(tail.strip())}"
                )
        elif last:
            content = _strip_end(content, ignorable)  # the reply was cut at the token limit: no end marker
        else:
            raise InvalidArgument(
                field, f"turn {k} ({role.strip()!r}) is not closed with {t.end} before the next {t.start}"
            )
        turns.append(Message(t.roles.get(role.strip(), role.strip()), content))
    return _split(turns, field)


def parse_mistral(text: str, field: str, ignorable: Iterable[str] = ()) -> tuple[list[Message], str]:
    """Mistral's `[INST] user [/INST] reply</s>` turns (see the module's docstring)."""
    ignorable = sorted({x for x in ignorable if x and x not in (INST, INST_END, SYS, SYS_END)}, key=len, reverse=True)
    first = min((i for i in (text.find(INST), text.find(SYS)) if i >= 0), default=-1)
    if first < 0:
        raise InvalidArgument(field, f"is not a mistral conversation: no {INST} marker")
    rest, turns = text[first:], []
    while rest := _lstrip(rest, ignorable):
        if rest.startswith(SYS):
            content, closed, rest = rest[len(SYS) :].partition(SYS_END)
            if not closed:
                raise InvalidArgument(field, f"{SYS} is not closed with {SYS_END}")
            turns.append(Message("system", content.strip()))
        elif rest.startswith(INST):
            content, closed, rest = rest[len(INST) :].partition(INST_END)
            if not closed:
                raise InvalidArgument(field, f"turn {len(turns)}: {INST} is not closed with {INST_END}")
            turns.append(Message("user", content.strip()))
            reply, _, _ = rest.partition(INST)
            reply_end = reply.find(EOS)
            closed_reply = reply_end >= 0
            content = reply[:reply_end] if closed_reply else _strip_end(reply, [*ignorable, EOS])
            if closed_reply and _strip(reply[reply_end + len(EOS) :], [*ignorable, EOS]).strip():
                extra = reply[reply_end + len(EOS) :].strip()
                raise InvalidArgument(
                    field, f"turn {len(turns)}: text after {EOS} that belongs to no turn: {_shown(extra)}"
                )
            if content.strip() or closed_reply:
                turns.append(Message("assistant", content.strip()))
            rest = rest[len(reply) :]
        else:
            raise InvalidArgument(field, f"text between turns: {_shown(rest.strip())}")
    return _split(turns, field)


def _split(turns: list[Message], field: str) -> tuple[list[Message], str]:
    if not turns or turns[-1].role != "assistant":
        raise InvalidArgument(
            field,
            "the last turn must be the assistant's reply (the response to score), got "
            + (f"role {_shown(turns[-1].role)}" if turns else "no turn"),
        )
    return turns[:-1], turns[-1].content


def _lstrip(text: str, tokens: list[str]) -> str:
    """`text` without the whitespace and `tokens` it starts with."""
    while (stripped := text.lstrip()) and (token := next((t for t in tokens if stripped.startswith(t)), None)):
        text = stripped[len(token) :]
    return text.lstrip()


def _strip(text: str, tokens: list[str]) -> str:
    for t in tokens:
        text = text.replace(t, "")
    return text


def _strip_end(text: str, tokens: list[str]) -> str:
    """`text` without the special tokens (and the whitespace between them) at its end."""
    while True:
        trimmed = text.rstrip()
        for t in tokens:
            if trimmed.endswith(t):
                text = trimmed[: -len(t)]
                break
        else:
            return text


def _shown(value: str, limit: int = 40) -> str:
    return repr(value if len(value) <= limit else value[:limit] + "...")
