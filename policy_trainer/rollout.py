"""Rollouts: batched sampling with a KV cache, and the masks PPO needs.

Queries are left-padded so that every row's last prompt token sits at the same column and
new tokens line up; `transformers`' `generate` keeps the KV cache and stops a row at EOS
(later columns of that row are padding). A response's real tokens are those up to and
including its first EOS; a response that never emitted EOS is all real and `ended` is
False (the missing-EOS penalty keys on it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from policy_trainer.prompts import Prompt


@dataclass
class Rollout:
    query_ids: torch.Tensor  # [B, P] left-padded prompt tokens
    query_mask: torch.Tensor  # [B, P] 1 on real prompt tokens
    response_ids: torch.Tensor  # [B, R] sampled tokens, right-padded after EOS
    response_mask: torch.Tensor  # [B, R] 1 on real response tokens (EOS included)
    ended: torch.Tensor  # [B] bool: the response emitted EOS
    texts: list[str]  # decoded responses, without EOS or special tokens, stripped
    prompt_index: list[int]  # [B] index of each row's prompt in the prompt list

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.query_ids, self.response_ids], dim=1)  # [B, P+R]

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.query_mask, self.response_mask], dim=1)  # [B, P+R]

    @property
    def response_len(self) -> int:
        return self.response_ids.shape[1]

    def rows(self, idx: torch.Tensor) -> Rollout:
        """The sub-batch of rows `idx` (for minibatches)."""
        keep = idx.tolist()
        return Rollout(
            self.query_ids[idx],
            self.query_mask[idx],
            self.response_ids[idx],
            self.response_mask[idx],
            self.ended[idx],
            [self.texts[i] for i in keep],
            [self.prompt_index[i] for i in keep],
        )


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids [B, P], mask [B, P]) padded on the left."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s) :] = 1
    return ids, mask


def response_mask(response_ids: torch.Tensor, stop_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Real tokens (up to and including the first stop token) and whether one was emitted.
    [B, R] -> mask [B, R], ended [B]."""
    is_stop = torch.isin(response_ids, torch.tensor(stop_ids, device=response_ids.device))  # [B, R]
    ended = is_stop.any(dim=1)  # [B]
    first_stop = torch.where(ended, is_stop.int().argmax(dim=1), response_ids.shape[1] - 1)  # [B]
    positions = torch.arange(response_ids.shape[1], device=response_ids.device)  # [R]
    return (positions[None, :] <= first_stop[:, None]).long(), ended  # [B, R], [B]


def decode(tokenizer, response_ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
    return [
        tokenizer.decode(ids[: int(m.sum())].tolist(), skip_special_tokens=True).strip()
        for ids, m in zip(response_ids.cpu(), mask.cpu(), strict=True)
    ]


@torch.no_grad()
def generate(
    lm,
    tokenizer,
    prompts: list[Prompt],
    prompt_index: list[int],
    stop_ids: list[int],
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    device: torch.device,
    autocast,
) -> Rollout:
    """Sample one completion per entry of `prompt_index` (repeat an index for several samples)."""
    from transformers import GenerationConfig

    query_ids, query_mask = left_pad([prompts[i].token_ids for i in prompt_index], tokenizer.pad_token_id)  # [B, P]
    config = GenerationConfig(
        do_sample=True,
        temperature=temperature,
        top_p=top_p,
        top_k=0,
        max_new_tokens=max_new_tokens,
        eos_token_id=stop_ids,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
    )
    with autocast():
        out = lm.generate(
            input_ids=query_ids.to(device), attention_mask=query_mask.to(device), generation_config=config
        )  # [B, P+R]
    response_ids = out[:, query_ids.shape[1] :].cpu()  # [B, R]
    mask, ended = response_mask(response_ids, stop_ids)
    return Rollout(
        query_ids, query_mask, response_ids, mask, ended, decode(tokenizer, response_ids, mask), list(prompt_index)
    )
