"""Token-budget batching: sort by length, fill batches up to a padded-token budget."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rm_service.models.formatting import Formatted


def token_budget_batches(lengths: Sequence[int], max_batch_tokens: int) -> list[list[int]]:
    """Index groups whose padded size (count x longest) stays within the budget.

    Items are taken longest first, so each batch holds items of similar length and
    padding stays small. A single item longer than the budget gets a batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        longest_if_added = max(longest, lengths[i])
        if current and longest_if_added * (len(current) + 1) > max_batch_tokens:
            batches.append(current)
            current, longest_if_added = [], lengths[i]
        current.append(i)
        longest = longest_if_added
    if current:
        batches.append(current)
    return batches


def collate(items: Sequence[Formatted], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors: input_ids, attention_mask [B, T] (+ token_type_ids), and
    completion_start [B], where each item's completion begins."""
    width = max(len(x) for x in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)  # [B, T]
    attention_mask = torch.zeros((len(items), width), dtype=torch.long)  # [B, T]
    for row, x in enumerate(items):
        input_ids[row, : len(x)] = torch.tensor(x.input_ids)
        attention_mask[row, : len(x)] = 1
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "completion_start": torch.tensor([x.completion_start for x in items], dtype=torch.long),
    }  # [B]
    if items[0].token_type_ids is not None:
        token_type_ids = torch.zeros((len(items), width), dtype=torch.long)  # [B, T]
        for row, x in enumerate(items):
            token_type_ids[row, : len(x)] = torch.tensor(x.token_type_ids)
        batch["token_type_ids"] = token_type_ids
    return batch
