"""The user model's formatting contract: a conversation -> token ids, and which of them it learns.

A conversation is rendered by the backbone's chat template, message by message: each message
is `header + content + footer` (ChatML: `<|im_start|>user\\n`, the text, `<|im_end|>\\n`; the
first message's header also holds what the template puts before it, e.g. a default system
prompt), each part tokenized on its own, so the ids of a conversation are the ids of its
messages end to end and a prompt is a prefix of the same conversation carried on. What the
user model predicts, after every assistant turn:

    the user goes on:  user header (its first token is the decision), content, stop token
    the user leaves:   END                                   (the decision, another token)

The stop token is the first token of the user footer (`<|im_end|>`); END is the tokenizer's EOS
unless that is the user header's first token. So "the user ends the conversation" is an event
the LM learns and scores like any token: P(end | conversation) = softmax(logits)[END] at the
decision position. NLL per user-turn token counts content + stop tokens; decisions are
reported apart (calibration of the end event).

Long conversations lose whole turns from their start (never dropped): training cuts one into
windows that each fit `max_tokens` and together hold every user turn once; serving keeps the
longest end of the conversation that leaves room for the turn to sample. The spec (template,
tokenizer fingerprint, END, stop, max tokens) is stored with every user-model version and
hashed, as the reward model's FormatSpec is.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from pydantic import BaseModel

from rm_service.conversation import Message
from rm_service.errors import FailedPrecondition
from rm_service.models.formatting import FALLBACK_CHAT_TEMPLATE, tokenizer_fingerprint

SENTINEL = "\x00rm-user-model\x00"
IGNORE = -100  # label of a position that is not learned


class UserFormat(BaseModel, frozen=True):
    """Everything that decides the ids of a conversation and what the user model learns of them."""

    chat_template: str
    max_tokens: int
    tokenizer_fingerprint: str
    end_id: int  # the token that ends the conversation, at a decision position
    stop_id: int  # the token that closes a user turn

    @property
    def hash(self) -> str:
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:16]


@dataclass
class Encoded:
    """A conversation (or a window of one) as the user model reads it."""

    input_ids: list[int]
    labels: list[int]  # the next-token target at each position (IGNORE where nothing is learned)
    kind: list[int] = field(default_factory=list)  # per position: 0 nothing, 1 user-turn token, 2 decision
    turn: list[int] = field(default_factory=list)  # per position: prior user turns of the turn it belongs to (-1: none)
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)


NOTHING, USER_TOKEN, DECISION = 0, 1, 2


class Formatter:
    """A tokenizer and a UserFormat: encodes conversations for training, evaluation and serving."""

    def __init__(self, tokenizer, spec: UserFormat):
        self.tokenizer, self.spec = tokenizer, spec
        self._parts: dict[tuple[str, bool], tuple[str, str]] = {}
        self._ids: dict[str, list[int]] = {}
        self.user_header = self.part_ids("user", first=False)[0]  # opens a user turn after an assistant turn

    @classmethod
    def for_tokenizer(cls, tokenizer, max_tokens: int) -> Formatter:
        """The default contract of a backbone: its own chat template, END = EOS."""
        template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else FALLBACK_CHAT_TEMPLATE
        probe = cls.__new__(cls)
        probe.tokenizer, probe._parts, probe._ids = tokenizer, {}, {}
        probe.spec = UserFormat(
            chat_template=template, max_tokens=max_tokens, tokenizer_fingerprint="", end_id=-1, stop_id=-1
        )
        header, footer = probe.part_ids("user", first=False)
        if not footer:
            raise FailedPrecondition("the chat template closes a user turn with nothing: the end of a turn is unknown")
        end = tokenizer.eos_token_id
        if end is None or (header and end == header[0]):
            raise FailedPrecondition(
                "the tokenizer's EOS is missing or opens a user turn, so it cannot mark the end of a conversation"
            )
        spec = UserFormat(
            chat_template=template,
            max_tokens=max_tokens,
            tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
            end_id=int(end),
            stop_id=int(footer[0]),
        )
        return cls(tokenizer, spec)

    # -- the parts of a message

    def _render(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(messages, chat_template=self.spec.chat_template, tokenize=False)

    def part_text(self, role: str, first: bool) -> tuple[str, str]:
        """(header, footer) text of a `role` message, first in the conversation or after another."""
        key = (role, first)
        if key not in self._parts:
            before = [] if first else [{"role": "assistant" if role == "user" else "user", "content": "x"}]
            prefix = self._render(before) if before else ""
            text = self._render(before + [{"role": role, "content": SENTINEL}])
            if not text.startswith(prefix) or text.count(SENTINEL) != 1:
                raise FailedPrecondition("the chat template does not render a conversation message by message")
            header, footer = text[len(prefix) :].split(SENTINEL)
            self._parts[key] = (header, footer)
        return self._parts[key]

    def _tok(self, text: str) -> list[int]:
        if text not in self._ids:
            self._ids[text] = self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        return self._ids[text]

    def part_ids(self, role: str, first: bool) -> tuple[list[int], list[int]]:
        header, footer = self.part_text(role, first)
        return self._tok(header), self._tok(footer)

    def content_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]

    def check(self, messages: list[Message]) -> None:
        """The template renders this conversation as its messages' parts end to end."""
        parts = "".join(h + m.content + f for i, m in enumerate(messages) for h, f in [self.part_text(m.role, i == 0)])
        if self._render([m.as_dict() for m in messages]) != parts:
            raise FailedPrecondition(
                "the chat template renders this conversation otherwise than message by message "
                "(it changes earlier turns or the text)"
            )

    # -- encoding

    def encode(self, messages: list[Message], ended: bool) -> Encoded:
        """The ids of `messages` with every user turn and every decision after an assistant turn
        labelled; `ended`: the conversation ends after its last message (an assistant turn)."""
        ids: list[int] = []
        labels: list[int] = []
        kind: list[int] = []
        turn: list[int] = []
        users = 0
        for i, m in enumerate(messages):
            header, footer = self.part_ids(m.role, i == 0)
            content = self.content_ids(m.content)
            body = header + content + footer
            start = len(ids)
            ids += body
            labels += [IGNORE] * len(body)
            kind += [NOTHING] * len(body)
            turn += [-1] * len(body)
            if m.role != "user":
                continue
            if i > 0 and messages[i - 1].role == "assistant" and header:  # the decision to go on
                labels[start - 1], kind[start - 1], turn[start - 1] = header[0], DECISION, users
            # positions predicting the content and the stop token (the first token of the footer)
            for p in range(max(start, start + len(header) - 1), start + len(header) + len(content)):
                labels[p], kind[p], turn[p] = ids[p + 1], USER_TOKEN, users
            users += 1
        if ended and messages and messages[-1].role == "assistant":
            labels[-1], kind[-1], turn[-1] = self.spec.end_id, DECISION, users
            ids.append(self.spec.end_id)  # the token the decision position predicts; nothing learns from it
            labels.append(IGNORE)
            kind.append(NOTHING)
            turn.append(-1)
        return Encoded(ids, labels, kind, turn)

    def windows(self, messages: list[Message], ended: bool) -> list[Encoded]:
        """Training and evaluation sequences of one conversation: the whole of it if it fits
        max_tokens, else windows cut at turn boundaries, the last ending at the conversation's
        end, each earlier one ending where the next begins; every user turn is learned in exactly
        one window (a decision at a window's first message is not learned). A single message
        longer than max_tokens keeps its end."""
        out: list[Encoded] = []
        end, last = len(messages), True
        user_before = [sum(m.role == "user" for m in messages[:i]) for i in range(len(messages) + 1)]
        while end > 0:
            start = 0
            enc = self.encode(messages[start:end], ended and last)
            while len(enc) > self.spec.max_tokens and end - start > 1:
                start += 1
                enc = self.encode(messages[start:end], ended and last)
            if start > 0:
                enc.turn = [t + user_before[start] if t >= 0 else t for t in enc.turn]
            if len(enc) > self.spec.max_tokens:  # one message alone is too long: keep its end
                cut = len(enc) - self.spec.max_tokens
                enc = Encoded(enc.input_ids[cut:], enc.labels[cut:], enc.kind[cut:], enc.turn[cut:], True)
            enc.truncated = enc.truncated or start > 0
            out.append(enc)
            end, last = start, False
        return out[::-1]

    def prompt(self, messages: list[Message], room: int) -> tuple[list[int], int, bool]:
        """(ids, decision position, truncated) of a conversation that ends with an assistant turn:
        its ids and the user header, cut at turn boundaries to leave `room` tokens of max_tokens
        for the turn to sample. The decision position is the last id before the header."""
        budget = max(1, self.spec.max_tokens - room)
        start = 0
        while True:
            enc = self.encode(messages[start:], ended=False)
            if len(enc) + len(self.user_header) <= budget or start == len(messages) - 1:
                break
            start += 1
        ids = enc.input_ids
        if len(ids) + len(self.user_header) > budget:  # the last message alone is too long: keep its end
            ids = ids[len(ids) + len(self.user_header) - budget :]
        return ids + self.user_header, len(ids) - 1, start > 0 or len(ids) < len(enc.input_ids)
