"""Sampling the next user turn of many conversations at once: batched, with a KV cache.

For a batch of conversations, each ending with an assistant turn:

1. prefill: the left-padded prompts (conversation + user header) in one forward pass, which
   fills the KV cache and gives the logits at the decision position and after the header;
2. the decision: P(end) = softmax(logits)[END] at the decision position; the user leaves with
   probability sigmoid(logit(P(end)) / temperature) (greedy at temperature 0: P(end) >= 0.5);
3. the turn: tokens sampled one at a time from the cache (temperature, top-p), until the stop
   token that closes a user turn or `max_new_tokens`; rows that are done leave the batch (their
   cache rows are dropped), so a step costs only the rows still writing.

One torch.Generator per call, seeded by the call's seed: the same call with the same seed
samples the same turns. The first token of a turn may not be the stop token (no empty turns).
`runnable()` is checked before every step: a call whose caller left or whose deadline passed
stops there (DeadlineExceeded), so abandoned work does not hold the model.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.generation import TemperatureLogitsWarper, TopPLogitsWarper

from rm_service.conversation import Message
from rm_service.errors import DeadlineExceeded
from rm_service.usermodel.runtime import UserRuntime, token_batches


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    seed: int = 0


@dataclass(frozen=True)
class Turn:
    """One conversation's next user turn, or the end of it."""

    content: str  # "" when ended
    ended: bool
    num_tokens: int  # tokens sampled (the stop token included); 0 when ended
    p_end: float  # the model's probability that the user leaves here
    complete: bool  # the turn closed with the stop token (False: cut at max_new_tokens, or ended)
    truncated: bool  # the conversation lost turns from its start to fit the model
    prompt_tokens: int


def simulate(
    runtime: UserRuntime,
    conversations: list[list[Message]],
    sampling: Sampling,
    batch_tokens: int = 16384,
    runnable=lambda: True,
) -> list[Turn]:
    """The next user turn (or the end) of each conversation, in order."""
    room = min(sampling.max_new_tokens, runtime.spec.max_tokens // 2)
    prompts = [runtime.formatter.prompt(c, room) for c in conversations]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i][0]))
    generator = torch.Generator(device=runtime.device).manual_seed(sampling.seed)
    out: list[Turn | None] = [None] * len(prompts)
    for batch in token_batches([len(prompts[i][0]) + room for i in order], batch_tokens):
        rows = [order[j] for j in batch]
        turns = _batch(runtime, [prompts[r][0] for r in rows], sampling, room, generator, runnable)
        for r, (tokens, ended, p_end, complete) in zip(rows, turns, strict=True):
            text = (
                "" if ended else runtime.tokenizer.decode(tokens[:-1] if complete else tokens, skip_special_tokens=True)
            )
            out[r] = Turn(text, ended, len(tokens), p_end, complete, prompts[r][2], len(prompts[r][0]))
    return out  # type: ignore[return-value]


@torch.inference_mode()
def _batch(
    runtime: UserRuntime,
    prompts: list[list[int]],
    sampling: Sampling,
    room: int,
    generator: torch.Generator,
    runnable,
) -> list[tuple[list[int], bool, float, bool]]:
    """(tokens, ended, P(end), closed by the stop token) of each prompt of one batch."""
    model, spec, dev = runtime.inference_model(), runtime.spec, runtime.device
    header = len(runtime.formatter.user_header)
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), runtime.pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding: every row's decision and last token share a column
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    ids, mask = ids.to(dev), mask.to(dev)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [b, W]
    _check(runnable)
    cache = DynamicCache()
    with runtime.autocast():
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=header + 1,
            **_cache_kwarg(model, cache),
        )
    logits = out.logits.float()  # [b, header + 1, V]: the decision position, then the header's tokens
    p_end = torch.softmax(logits[:, 0], dim=-1)[:, spec.end_id]  # [b]
    ended = _decide(p_end, sampling.temperature, generator)  # [b] bool
    tokens: list[list[int]] = [[] for _ in prompts]
    complete = [False] * len(prompts)
    live = [i for i in range(len(prompts)) if not ended[i]]  # rows still writing, in cache order
    if not live:
        return [([], True, float(p_end[i]), False) for i in range(len(prompts))]
    keep = torch.tensor(live, device=dev, dtype=torch.long)
    cache.batch_select_indices(keep)
    mask, last = mask[keep], positions[keep, -1]  # [l, W], [l]
    next_logits = logits[keep, -1]  # [l, V]
    for step in range(room):
        _check(runnable)
        if step == 0:  # no empty turn
            next_logits[:, spec.stop_id] = -math.inf
        chosen = _sample(next_logits, sampling, generator)  # [l]
        done = []
        for j, (row, token) in enumerate(zip(live, chosen.tolist(), strict=True)):
            tokens[row].append(token)
            if token == spec.stop_id:
                complete[row] = True
                done.append(j)
        if step == room - 1:
            break
        if done:  # finished rows leave the batch
            stay = [j for j in range(len(live)) if j not in set(done)]
            live = [live[j] for j in stay]
            if not live:
                break
            index = torch.tensor(stay, device=dev, dtype=torch.long)
            cache.batch_select_indices(index)
            mask, last, chosen = mask[index], last[index], chosen[index]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)  # [l, W + step + 1]
        last = last + 1
        with runtime.autocast():
            out = model(
                input_ids=chosen[:, None],
                attention_mask=mask,
                position_ids=last[:, None],
                use_cache=True,
                **_cache_kwarg(model, cache),
            )
        next_logits = out.logits[:, -1].float()  # [l, V]
    return [(tokens[i], bool(ended[i]), float(p_end[i]), complete[i]) for i in range(len(prompts))]


def _decide(p_end: torch.Tensor, temperature: float, generator: torch.Generator) -> list[bool]:
    """Whether each user leaves: the end event's log-odds scaled by 1/temperature, like a token's."""
    if temperature == 0:
        return (p_end >= 0.5).tolist()
    p = p_end.double().clamp(1e-12, 1 - 1e-12)
    p_t = torch.sigmoid(torch.log(p / (1 - p)) / temperature)  # [b]
    u = torch.rand(p_t.shape, generator=generator, device=p_t.device, dtype=torch.float64)
    return (u < p_t).tolist()


def _sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> torch.Tensor:
    """One token per row [l, V] -> [l]: greedy at temperature 0, else temperature and top-p."""
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    scores = TemperatureLogitsWarper(sampling.temperature)(None, logits)
    if sampling.top_p < 1.0:
        scores = TopPLogitsWarper(sampling.top_p)(None, scores)
    probs = torch.softmax(scores, dim=-1)  # [l, V]
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _cache_kwarg(model: torch.nn.Module, cache: DynamicCache) -> dict:
    """The KV cache argument under its name: `cache` in recent transformers, `past_key_values` before."""
    return {"cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values": cache}


def _check(runnable) -> None:
    if not runnable():
        raise DeadlineExceeded("the call's deadline passed or it was cancelled while its user turns were sampled")
