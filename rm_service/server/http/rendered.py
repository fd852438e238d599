"""Conversations that arrive as rendered text: the ChatML a policy's tokenizer decoded.

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
Callers with other templates send messages (`/classify` or `/pooling` with `messages`, or gRPC).
"""

from __future__ import annotations

from collections.abc import Iterable

from rm_service.conversation import Message
from rm_service.errors import InvalidArgument

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"


def parse_chatml(text: str, field: str, ignorable: Iterable[str] = ()) -> tuple[list[Message], str]:
    """(prompt messages, completion) of one ChatML conversation; InvalidArgument naming `field`
    when `text` does not follow the contract above. `ignorable`: special tokens (EOS, padding)
    that may stand between and after turns."""
    ignorable = sorted({t for t in ignorable if t and t not in (IM_START, IM_END)}, key=len, reverse=True)
    first = text.find(IM_START)
    if first < 0:
        raise InvalidArgument(
            field,
            f"is not a ChatML conversation: no {IM_START} marker. Send the conversation rendered with a ChatML "
            'chat template, or as messages (POST /classify or /pooling with "messages")',
        )
    parts = text[first + len(IM_START) :].split(IM_START)
    turns = []
    for k, part in enumerate(parts):
        last = k == len(parts) - 1
        role, newline, rest = part.partition("\n")
        if not newline:
            raise InvalidArgument(field, f"turn {k}: the role must be followed by a newline ({IM_START}ROLE\\n...)")
        content, closed, tail = rest.partition(IM_END)
        if closed:
            if _strip(tail, ignorable).strip():
                raise InvalidArgument(
                    field, f"turn {k}: text after {IM_END} that belongs to no turn: {_shown(tail.strip())}"
                )
        elif last:
            content = _strip_end(content, ignorable)  # the reply was cut at the token limit: no end marker
        else:
            raise InvalidArgument(
                field, f"turn {k} ({role.strip()!r}) is not closed with {IM_END} before the next {IM_START}"
            )
        turns.append(Message(role.strip(), content))
    if turns[-1].role != "assistant":
        raise InvalidArgument(
            field,
            f"the last turn must be the assistant's reply (the response to score), got role {_shown(turns[-1].role)}",
        )
    return turns[:-1], turns[-1].content


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
