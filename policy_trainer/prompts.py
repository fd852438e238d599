"""Prompts for rollouts: from a JSONL file or the preference store, held-out split, sampler.

A prompt is every turn before the completion and ends with a user (or system) turn. The
policy's chat template renders it with the generation prompt (`<|im_start|>assistant\\n` for
SmolLM2). A prompt longer than `max_prompt_tokens` is cut from the left at turn boundaries,
never dropped (`fit_to_budget`): the oldest turns go first (a leading system message stays
while it fits), the kept turns start with a user turn, and only when the last turn alone is
over the budget does its text lose its start, in whole tokens. This is the reward model's
contract too (models.formatting keeps the end of a conversation): the latest turns decide the
reply. Before, long prompts were skipped whole: 36% of HH's multi-turn prompts at 192 tokens,
84% at 96, so the longer a conversation the less it was trained on.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from rm_service.conversation import HHFormatError, Message, conversation_id, parse_conversation, validate_messages
from rm_service.errors import InvalidArgument

if TYPE_CHECKING:
    from policy_trainer.settings import PPOSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prompt:
    messages: list[Message]  # what the policy sees (cut to the budget) and what is scored
    token_ids: list[int]  # chat template applied, generation prompt included
    source_id: str = ""  # conversation id of the whole prompt before any cut ("" : of `messages`)
    dropped_turns: int = 0  # oldest messages left out to fit the budget
    cut_text: bool = False  # the last turn alone was over the budget and lost its start

    @property
    def conversation_id(self) -> str:
        """The id of the whole prompt as read (what dedup and the held-out split key on)."""
        return self.source_id or conversation_id(self.messages)


class PromptError(ValueError):
    """A prompts file or store that cannot be used; the message names the line."""


def prompt_from_record(record: dict) -> list[Message]:
    """One JSONL record -> prompt messages. Accepted shapes:
    {"prompt": [messages] | "text"}, {"messages": [...]} (turns up to the last user turn),
    {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ..."} (HH-RLHF; the turns before the final answer)."""
    if "prompt" in record:
        value = record["prompt"]
        messages = (
            [Message("user", value)] if isinstance(value, str) else [Message(m["role"], m["content"]) for m in value]
        )
    elif "messages" in record:
        messages = [Message(m["role"], m["content"]) for m in record["messages"]]
        while messages and messages[-1].role == "assistant":
            messages.pop()
    elif "chosen" in record and isinstance(record["chosen"], str):
        messages = parse_conversation(record["chosen"])[:-1]
    else:
        raise PromptError("has none of the keys prompt, messages, chosen")
    validate_messages(messages, "prompt")
    return messages


def read_prompts_file(path: Path) -> list[list[Message]]:
    """Prompts of a JSONL file. Malformed lines are skipped and reported with their line
    numbers, as `rm-service import` does (the shared HH file has a few); a file without a
    single usable line is an error."""
    if not path.is_file():
        raise PromptError(f"prompts file {path} does not exist")
    out, rejected = [], []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise PromptError("is not a JSON object")
                out.append(prompt_from_record(record))
            except (json.JSONDecodeError, PromptError, HHFormatError, InvalidArgument, KeyError, TypeError) as exc:
                rejected.append(f"{path}:{number}: {exc}")
    if rejected:
        log.warning(
            "skipped %d malformed prompt line(s): %s%s",
            len(rejected),
            "; ".join(rejected[:3]),
            " ..." if len(rejected) > 3 else "",
        )
    if not out:
        raise PromptError(f"{path} holds no usable prompt" + (f" ({rejected[0]})" if rejected else " (it is empty)"))
    return out


def read_prompts_store(path: Path) -> list[list[Message]]:
    """Every conversation (prompt) of a preference store, read-only."""
    from rm_service.settings import StoreSettings
    from rm_service.store.db import Store
    from rm_service.store.read import conversations

    if not path.is_file():
        raise PromptError(f"store file {path} does not exist")
    store = Store(StoreSettings(path=path), read_only=True)
    try:
        return conversations(store)
    finally:
        store.close()


def encode(tokenizer, messages: list[Message]) -> list[int]:
    """Chat template with the generation prompt, as token ids."""
    ids = tokenizer.apply_chat_template([m.as_dict() for m in messages], add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "keys"):  # transformers may return a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def fit_to_budget(tokenizer, messages: list[Message], max_tokens: int) -> tuple[list[Message], list[int], int, bool]:
    """`messages` cut from the left at turn boundaries until the chat template's rendering
    (generation prompt included) holds at most `max_tokens` tokens: (kept messages, their ids,
    messages dropped, whether the last turn's text lost its start). The kept turns start with
    a user turn (or are the last turn alone); a leading system message is kept while it fits."""
    ids = encode(tokenizer, messages)
    if len(ids) <= max_tokens:
        return messages, ids, 0, False
    system = messages[:1] if messages[0].role == "system" else []
    body = messages[len(system) :]
    starts = [i for i, m in enumerate(body) if m.role == "user" and i > 0] + [len(body) - 1]
    for head in (system, []) if system else ([],):  # with the system message first, then without
        for start in starts:
            kept = head + body[start:]
            ids = encode(tokenizer, kept)
            if len(ids) <= max_tokens:
                return kept, ids, len(messages) - len(kept), False
    last = messages[-1]
    kept = [cut_text(tokenizer, last, max_tokens)]
    return kept, encode(tokenizer, kept), len(messages) - 1, True


def cut_text(tokenizer, message: Message, max_tokens: int) -> Message:
    """`message` with the start of its text cut, in whole tokens, so that it alone renders in
    at most `max_tokens` tokens."""
    overhead = len(encode(tokenizer, [Message(message.role, "")]))
    if overhead >= max_tokens:
        raise PromptError(
            f"max_prompt_tokens={max_tokens} cannot hold the chat template's {overhead} tokens of one turn"
        )
    enc = tokenizer(message.content, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    offsets = enc["offset_mapping"]
    keep = max_tokens - overhead
    while keep > 0:  # re-tokenising the cut text can merge or split a token at the cut: shrink until it fits
        text = message.content[offsets[len(offsets) - keep][0] :].lstrip()
        if len(encode(tokenizer, [Message(message.role, text)])) <= max_tokens:
            return Message(message.role, text)
        keep -= 1
    raise PromptError(f"max_prompt_tokens={max_tokens} cannot hold any text of a {message.role} turn")


def build_prompts(conversations: list[list[Message]], tokenizer, max_prompt_tokens: int) -> list[Prompt]:
    """Deduplicated (by conversation id), tokenised prompts in a fixed order; a prompt over
    `max_prompt_tokens` is cut from the left at turn boundaries (fit_to_budget), never dropped."""
    seen: dict[str, list[Message]] = {}
    for messages in conversations:
        seen.setdefault(conversation_id(messages), messages)
    prompts, cut, cut_texts = [], 0, 0
    for cid in sorted(seen):
        messages, ids, dropped, text_cut = fit_to_budget(tokenizer, seen[cid], max_prompt_tokens)
        prompts.append(Prompt(messages, ids, cid, dropped, text_cut))
        cut += dropped > 0 or text_cut
        cut_texts += text_cut
    if cut:
        log.info(
            "cut %d of %d prompts from the left to fit %d tokens (%d of them down to part of their last turn)",
            cut, len(seen), max_prompt_tokens, cut_texts,
        )  # fmt: skip
    if not prompts:
        raise PromptError("no prompt read")
    return prompts


def split_heldout(prompts: list[Prompt], n_eval: int) -> tuple[list[Prompt], list[Prompt]]:
    """(train, held-out): the held-out prompts are the first n_eval by conversation id, a
    hash, so the split is fixed for a given file whatever the seed."""
    if n_eval >= len(prompts):
        raise PromptError(f"{len(prompts)} prompts cannot hold out {n_eval} and leave any to train on")
    ordered = sorted(prompts, key=lambda p: p.conversation_id)  # already in this order; explicit for readers
    return ordered[n_eval:], ordered[:n_eval]


class PromptSampler:
    """Shuffled passes over the training prompts, resumable (its state is in checkpoints)."""

    def __init__(self, n: int, seed: int):
        self.n = n
        self.rng = np.random.default_rng(seed)
        self.order = self.rng.permutation(n)
        self.pos = 0

    def next(self, k: int) -> list[int]:
        out: list[int] = []
        while len(out) < k:
            if self.pos == self.n:
                self.order, self.pos = self.rng.permutation(self.n), 0
            out.append(int(self.order[self.pos]))
            self.pos += 1
        return out

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "order": self.order.tolist(), "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.order = np.asarray(state["order"])
        self.pos = int(state["pos"])


def read_conversations(s: PPOSettings) -> list[list]:
    """The prompts' messages, from the file or the store (read before the model loads, so a
    bad file fails in a second)."""
    if s.prompts_file is not None:
        return read_prompts_file(s.prompts_file)
    if s.prompts_store is not None:
        return read_prompts_store(s.prompts_store)
    raise ValueError("no prompts: set prompts_file (JSONL) or prompts_store (a DuckDB store file)")


def prompt_sets(s: PPOSettings, conversations: list[list], tokenizer) -> tuple[list[Prompt], list[Prompt]]:
    """(training prompts, held-out prompts), tokenised with the policy's chat template."""
    train, heldout = split_heldout(build_prompts(conversations, tokenizer, s.max_prompt_tokens), s.eval_prompts)
    return (train[: s.max_prompts] if s.max_prompts else train), heldout
