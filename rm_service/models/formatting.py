"""The formatting contract: (prompt messages, completion) -> model input ids.

Training, evaluation and serving all call `format_item`, and every reward-model version
stores its FormatSpec and the spec's hash, so a model is never served with another format
than it was trained with.

- causal backbones: the backbone's chat template renders prompt + completion as the final
  assistant turn; trailing whitespace is stripped and the sequence ends with EOS (appended
  if the template did not put it there); the score is read at that last token.
- encoder backbones (cross-encoders): `[CLS] prompt [SEP] completion [SEP]`, the prompt
  rendered as "Role: text" lines.
- truncation keeps the end of the conversation: tokens are cut from the start. For
  encoders the prompt's start is cut first and the completion keeps at least 3/4 of the budget.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel

from rm_service.conversation import Message

FORMAT_VERSION = 1
ENCODER_MODEL_TYPES = {"bert", "roberta", "xlm-roberta", "distilbert", "electra", "deberta", "deberta-v2", "modernbert", "mpnet"}
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

    @property
    def hash(self) -> str:
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class Formatted:
    input_ids: list[int]
    token_type_ids: list[int] | None
    truncated: bool

    def __len__(self) -> int:
        return len(self.input_ids)


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the vocabulary and special tokens: a different tokenizer, a different hash."""
    vocab = sorted(tokenizer.get_vocab().items())
    special = sorted(tokenizer.special_tokens_map.items(), key=lambda kv: kv[0])
    blob = json.dumps([vocab, special], ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def spec_for(tokenizer, model_type: str, max_tokens: int) -> FormatSpec:
    """The default contract for a backbone: its own chat template, EOS at the end."""
    kind = "encoder" if model_type in ENCODER_MODEL_TYPES else "causal"
    template = None
    if kind == "causal":
        template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else FALLBACK_CHAT_TEMPLATE
    model_max = getattr(tokenizer, "model_max_length", None) or max_tokens
    if kind == "encoder" and model_max < 100_000:
        max_tokens = min(max_tokens, int(model_max))
    return FormatSpec(kind=kind, chat_template=template, max_tokens=max_tokens, tokenizer_fingerprint=tokenizer_fingerprint(tokenizer))


def format_item(tokenizer, spec: FormatSpec, prompt: list[Message], completion: str) -> Formatted:
    """Token ids of one (prompt, completion) under `spec`."""
    if spec.kind == "causal":
        return _format_causal(tokenizer, spec, prompt, completion)
    return _format_encoder(tokenizer, spec, prompt, completion)


def _format_causal(tokenizer, spec: FormatSpec, prompt: list[Message], completion: str) -> Formatted:
    messages = [m.as_dict() for m in prompt] + [{"role": "assistant", "content": completion}]
    text = tokenizer.apply_chat_template(messages, chat_template=spec.chat_template, tokenize=False).rstrip()
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    eos = tokenizer.eos_token_id
    if spec.eos_policy == "ensure_eos" and eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    truncated = len(ids) > spec.max_tokens
    if truncated:
        ids = ids[-spec.max_tokens :]  # keep the end of the conversation
    return Formatted(ids, None, truncated)


def render_prompt_text(prompt: list[Message]) -> str:
    """Prompt as plain "Role: text" lines, for encoders that have no chat template."""
    return "\n".join(f"{ENCODER_ROLE_NAMES[m.role]}: {m.content}" for m in prompt)


def _format_encoder(tokenizer, spec: FormatSpec, prompt: list[Message], completion: str) -> Formatted:
    p = tokenizer(render_prompt_text(prompt), add_special_tokens=False, verbose=False)["input_ids"]
    c = tokenizer(completion, add_special_tokens=False, verbose=False)["input_ids"]
    budget = spec.max_tokens - 3  # [CLS] p [SEP] c [SEP]
    truncated = len(p) + len(c) > budget
    if truncated:
        c = c[: max(budget - len(p), (3 * budget) // 4)]
        p = p[len(p) - (budget - len(c)) :] if budget > len(c) else []
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    ids = [cls, *p, sep, *c, sep]
    token_type_ids = [0] * (len(p) + 2) + [1] * (len(c) + 1)
    return Formatted(ids, token_type_ids, truncated)
