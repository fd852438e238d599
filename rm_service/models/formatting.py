"""The formatting contract: (prompt messages, completion) -> model input ids.

Training, evaluation and serving all call `format_item`, and every reward-model version
stores its FormatSpec and the spec's hash, so a model is never served with another format
than it was trained with.

- causal backbones, style "rm_service" (what rm-service trains): the backbone's chat template
  renders prompt + completion as the final assistant turn; trailing whitespace is stripped
  and the sequence ends with EOS (appended if the template did not put it there); the score
  is read at that last token.
- causal checkpoints from elsewhere, style "trl" (TRL's RewardTrainer): the chat template's
  text tokenized as it is, nothing stripped or appended; the checkpoint's own
  `*ForSequenceClassification` reads the score at the last token that is not padding.
- encoder backbones (cross-encoders): `[CLS] prompt [SEP] completion [SEP]`, the prompt
  rendered as "Role: text" lines (a lone user turn as its bare text).
- encoder checkpoints from elsewhere, style "pair": the tokenizer's own pair encoding of
  (prompt text, completion), as OpenAssistant's reward models were trained: each family's
  special tokens (RoBERTa's `<s> a </s></s> b </s>`, DistilBERT without token types).
- truncation keeps the end of the conversation: tokens are cut from the start. For
  encoders the prompt's start is cut first and the completion keeps at least 3/4 of the budget.

Text the model cannot read is cut before it reaches the chat template and the tokeniser, so an
item costs what its window costs whatever its length (a 16 MB prompt formats in milliseconds):
the kept text is the end of the conversation (for encoders, the prompt's end and the
completion's start) with CUT_MARGIN_TOKENS tokens to spare, and the ids are those of formatting
the whole text and truncating. Messages wholly outside the window keep their role with no text,
and are dropped in pairs (a leading system message stays), so templates that check the roles'
order or the system turn see what they would have seen. When the kept text turns out to hold
fewer tokens than the window needs (long tokens), it is widened and formatted again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel

from rm_service.conversation import Message

FORMAT_VERSION = 1
ENCODER_MODEL_TYPES = {
    "bert",
    "roberta",
    "xlm-roberta",
    "distilbert",
    "electra",
    "deberta",
    "deberta-v2",
    "modernbert",
    "mpnet",
}
# Used only when a causal tokenizer ships no chat template.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize }}: {{ message['content'] }}\n\n{% endfor %}"
)
ENCODER_ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}


class FormatSpec(BaseModel, frozen=True):
    """Everything that decides the token ids a (prompt, completion) becomes."""

    version: int = FORMAT_VERSION
    kind: Literal["causal", "encoder"]
    chat_template: str | None = None
    eos_policy: Literal["ensure_eos", "none"] = "ensure_eos"
    truncation_side: Literal["left"] = "left"
    max_tokens: int
    tokenizer_fingerprint: str
    style: Literal["rm_service", "trl", "pair"] = "rm_service"

    @property
    def hash(self) -> str:
        # Fields added after version 1 enter the hash only when they differ from their default,
        # so the hashes of versions trained before them stay what they were.
        late = {name for name in _LATE_FIELDS if getattr(self, name) == type(self).model_fields[name].default}
        return hashlib.sha256(self.model_dump_json(exclude=late).encode()).hexdigest()[:16]


_LATE_FIELDS = ("style",)


@dataclass(frozen=True, slots=True)
class Formatted:
    input_ids: list[int]
    token_type_ids: list[int] | None
    truncated: bool
    completion_start: int = 0  # index of the completion's first token (0: unknown, or cut away)

    def __len__(self) -> int:
        return len(self.input_ids)


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the vocabulary and special tokens: a different tokenizer, a different hash."""
    vocab = sorted(tokenizer.get_vocab().items())
    special = sorted(tokenizer.special_tokens_map.items(), key=lambda kv: kv[0])
    blob = json.dumps([vocab, special], ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def spec_for(tokenizer, model_type: str, max_tokens: int, style: str = "rm_service") -> FormatSpec:
    """The default contract for a backbone: its own chat template; style "rm_service" ends
    every item with EOS, style "trl" keeps the template's text as TRL's RewardTrainer does."""
    kind = "encoder" if model_type in ENCODER_MODEL_TYPES else "causal"
    template = None
    if kind == "causal":
        template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else FALLBACK_CHAT_TEMPLATE
    model_max = getattr(tokenizer, "model_max_length", None) or max_tokens
    if kind == "encoder" and model_max < 100_000:
        max_tokens = min(max_tokens, int(model_max))
    if style != "rm_service":  # a checkpoint from elsewhere: TRL's text for decoders, the pair encoding for encoders
        style = "trl" if kind == "causal" else "pair"
    return FormatSpec(
        kind=kind,
        chat_template=template,
        max_tokens=max_tokens,
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        eos_policy="none" if style == "trl" else "ensure_eos",
        style=style,
    )


def format_item(tokenizer, spec: FormatSpec, prompt: list[Message], completion: str) -> Formatted:
    """Token ids of one (prompt, completion) under `spec`, from the text the window can hold."""
    chars = (spec.max_tokens + CUT_MARGIN_TOKENS) * CHARS_PER_TOKEN
    while True:
        item = _FORMATTERS[spec.kind if spec.style != "pair" else "pair"](tokenizer, spec, prompt, completion, chars)
        if item is not None:
            return item
        chars *= 4  # the kept text held fewer tokens than the window: keep more


CUT_MARGIN_TOKENS = (
    128  # tokens kept beyond the window (template tokens included), so the window's ids do not depend on the cut
)
CHARS_PER_TOKEN = 4  # first guess of the characters one token spans (English BPE and WordPiece: 3-5)


def format_raw(tokenizer, spec: FormatSpec, text: str | list[int]) -> Formatted:
    """One text (or its token ids) scored as it is, the HTTP routes' raw mode (as OpenRLHF's
    `serve_rm` scores a query): its tokens under the version's tokenizer, no special tokens added,
    no chat template parsed or applied, nothing stripped or appended; an encoder's [CLS] and [SEP]
    around them. Too long, the end is kept (the reply), as format_item keeps it."""
    encoder = spec.kind == "encoder"
    room = spec.max_tokens - (2 if encoder else 0)  # [CLS] text [SEP]
    ids = _last_ids(tokenizer, text, room) if isinstance(text, str) else list(text)
    truncated = len(ids) > room
    if truncated:
        ids = ids[len(ids) - room :]
    if not encoder:
        return Formatted(ids, None, truncated)
    ids = [tokenizer.cls_token_id, *ids, tokenizer.sep_token_id]
    typed = spec.style != "pair" or "token_type_ids" in tokenizer.model_input_names  # as the version's items are
    return Formatted(ids, [0] * len(ids) if typed else None, truncated)


def _last_ids(tokenizer, text: str, room: int) -> list[int]:
    """The ids of (at least) the last `room` tokens' worth of `text`, from its end alone."""
    chars = (room + CUT_MARGIN_TOKENS) * CHARS_PER_TOKEN
    while True:
        ids = _ids(tokenizer, _cut(text, chars, "end"))
        if len(text) <= chars or len(ids) >= room + CUT_MARGIN_TOKENS:
            return ids
        chars *= 4


def keep_last_chars(prompt: list[Message], completion: str, chars: int) -> tuple[list[Message], str, bool]:
    """(prompt, completion, cut): the conversation's last `chars` characters of text; messages
    before them keep their role with no text, and are dropped in pairs after a leading system turn."""
    if len(completion) + sum(len(m.content) for m in prompt) <= chars:
        return prompt, completion, False
    kept_completion = completion[-chars:]
    left, kept = chars - len(kept_completion), []
    for m in reversed(prompt):
        text = m.content[max(0, len(m.content) - left) :] if left > 0 else ""
        left -= len(text)
        kept.append(m if len(text) == len(m.content) else Message(m.role, text))
    kept.reverse()
    head = 1 if kept and kept[0].role == "system" else 0
    blank = next((i for i in range(head, len(kept)) if kept[i].content), len(kept)) - head
    return kept[:head] + kept[head + blank - blank % 2 :], kept_completion, True


def _format_causal(tokenizer, spec: FormatSpec, prompt: list[Message], completion: str, chars: int) -> Formatted | None:
    prompt, completion, cut = keep_last_chars(prompt, completion, chars)
    messages = [m.as_dict() for m in prompt] + [{"role": "assistant", "content": completion}]
    text = tokenizer.apply_chat_template(messages, chat_template=spec.chat_template, tokenize=False)
    if spec.style == "rm_service":
        text = text.rstrip()
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    eos = tokenizer.eos_token_id
    if spec.eos_policy == "ensure_eos" and eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    if cut and len(ids) < spec.max_tokens + CUT_MARGIN_TOKENS:
        return None
    start = prompt_length(tokenizer, spec, prompt, ids)
    truncated = len(ids) > spec.max_tokens
    if truncated:
        drop = len(ids) - spec.max_tokens
        ids, start = ids[drop:], max(0, start - drop)  # keep the end of the conversation
    return Formatted(ids, None, truncated, start)


def prompt_length(tokenizer, spec: FormatSpec, prompt: list[Message], ids: list[int]) -> int:
    """How many of `ids` (the whole formatted item) are the prompt: the chat template's
    rendering of the prompt with the assistant header, when its tokens are a prefix of `ids`
    (0 when the template does not render it so)."""
    head = tokenizer.apply_chat_template(
        [m.as_dict() for m in prompt], chat_template=spec.chat_template, tokenize=False, add_generation_prompt=True
    )
    head_ids = tokenizer(head, add_special_tokens=False, verbose=False)["input_ids"]
    return len(head_ids) if len(head_ids) < len(ids) and ids[: len(head_ids)] == head_ids else 0


def render_prompt_text(prompt: list[Message]) -> str:
    """Prompt as plain "Role: text" lines, for encoders that have no chat template."""
    return "\n".join(f"{ENCODER_ROLE_NAMES[m.role]}: {m.content}" for m in prompt)


def _cut(text: str, chars: int, keep: str) -> str:
    """The first (keep="start") or last (keep="end") `chars` characters of `text`."""
    return text if len(text) <= chars else text[:chars] if keep == "start" else text[-chars:]


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def _format_encoder(
    tokenizer, spec: FormatSpec, prompt: list[Message], completion: str, chars: int
) -> Formatted | None:
    text = render_prompt_text(keep_last_chars(prompt, "", chars)[0])
    p, c = _ids(tokenizer, _cut(text, chars, "end")), _ids(tokenizer, _cut(completion, chars, "start"))
    window = spec.max_tokens + CUT_MARGIN_TOKENS
    if (len(text) > chars and len(p) < window) or (len(completion) > chars and len(c) < window):
        return None  # the prompt keeps its end and the completion its start: too few tokens kept
    budget = spec.max_tokens - 3  # [CLS] p [SEP] c [SEP]
    truncated = len(p) + len(c) > budget
    if truncated:
        c = c[: max(budget - len(p), (3 * budget) // 4)]
        p = p[len(p) - (budget - len(c)) :] if budget > len(c) else []
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    ids = [cls, *p, sep, *c, sep]
    token_type_ids = [0] * (len(p) + 2) + [1] * (len(c) + 1)
    return Formatted(ids, token_type_ids, truncated, len(p) + 2)


def _format_pair(tokenizer, spec: FormatSpec, prompt: list[Message], completion: str, chars: int) -> Formatted | None:
    """The tokenizer's own pair encoding of (prompt text, completion). When it is too long the
    prompt text loses its start (whole tokens, found through the offsets), then, if the
    completion alone is over budget, the tokenizer cuts the longest side (both keep their start;
    the longer one, in tokens, keeps the odd middle token).

    Cut before tokenising: the prompt text keeps its end, or its start when the completion alone
    fills the window; then the completion (one message, within the text cap) is tokenised whole,
    so which side is the longer one is known."""
    text = prompt[0].content if len(prompt) == 1 and prompt[0].role == "user" else render_prompt_text(prompt)
    window = spec.max_tokens + CUT_MARGIN_TOKENS
    alone = len(_ids(tokenizer, _cut(completion, chars, "start")))
    fills = alone + 3 >= spec.max_tokens  # the completion alone fills the window: both sides keep their start
    t_cut, c_cut = len(text) > chars, len(completion) > chars and not (fills and len(text) > chars)
    if fills and t_cut and len(completion) > chars:
        alone = len(_ids(tokenizer, completion))
    text, completion = (
        _cut(text, chars, "start" if fills else "end"),
        _cut(completion, chars, "start") if c_cut else completion,
    )
    kept = len(_ids(tokenizer, text))
    if (c_cut and alone < window) or (t_cut and kept < window):
        return None
    if fills and (t_cut and kept <= alone or c_cut and alone <= kept):
        return None  # a side that was cut must be known to be the longer one
    enc = tokenizer(text, completion, add_special_tokens=True, verbose=False)
    truncated = len(enc["input_ids"]) > spec.max_tokens
    if truncated:
        head = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        keep = len(head["input_ids"]) - (len(enc["input_ids"]) - spec.max_tokens)  # prompt tokens that fit
        if keep > 0:
            text = text[head["offset_mapping"][len(head["input_ids"]) - keep][0] :]
            enc = tokenizer(text, completion, add_special_tokens=True, verbose=False)
        if len(enc["input_ids"]) > spec.max_tokens:
            enc = tokenizer(
                text,
                completion,
                add_special_tokens=True,
                truncation="longest_first",
                max_length=spec.max_tokens,
                verbose=False,
            )
    ids, types = list(enc["input_ids"]), enc.get("token_type_ids")
    return Formatted(ids, list(types) if types is not None else None, truncated, max(0, len(ids) - alone - 1))


_FORMATTERS = {"causal": _format_causal, "encoder": _format_encoder, "pair": _format_pair}
