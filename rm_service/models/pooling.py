"""Which hidden states a reward head reads, and how they are pooled into one vector.

A `Pooling` names backbone layers and a method; the feature vector is the concatenation,
over those layers, of:

    last       the hidden state at the last real token (causal: the EOS closing the completion)
    mean       the mean over the completion's tokens
    last+mean  both, one after the other
    all_mean   the mean over every real token (sentence-transformers' pooling; encoders)

Layer l is the output of transformer block l (0 is the embeddings, the backbone's depth N
is its normed final output). Reading middle layers is often better for reward heads than
the last one (the last is shaped for next-token prediction), and cheaper: the backbone is
cut after the deepest layer read (`truncate`), so blocks past it never run.

`layers=()` means the backbone's own output (`last_hidden_state`), as before poolings
named layers.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel
from torch import nn

Method = Literal["last", "mean", "last+mean", "all_mean"]


class Pooling(BaseModel, frozen=True):
    layers: tuple[int, ...] = ()
    method: Method = "last"

    @property
    def name(self) -> str:
        return f"{self.method}@{'+'.join(map(str, self.layers)) or 'out'}"

    @property
    def needs_completion_start(self) -> bool:
        return self.method in ("mean", "last+mean")

    def width(self, hidden: int) -> int:
        """Length of the pooled vector for a backbone of hidden size `hidden`."""
        return hidden * max(1, len(self.layers)) * (2 if self.method == "last+mean" else 1)


def legacy_pooling(name: str) -> Pooling:
    """The Pooling of a version written before poolings named layers ("last_token", "mean")."""
    return Pooling(method={"last_token": "last", "mean": "all_mean"}.get(name, name))


def pool(
    hidden: torch.Tensor, attention_mask: torch.Tensor, completion_start: torch.Tensor | None, method: Method
) -> torch.Tensor:
    """One layer's hidden states pooled per row, [B, T, H] -> [B, H] (or [B, 2H] for last+mean).
    Rows are right-padded; `completion_start` [B] is the index of each completion's first token.
    Pooled in fp32 whatever the states' precision (a bf16 sum over hundreds of tokens rounds)."""
    hidden = hidden.float()
    mask = attention_mask.to(hidden.dtype)  # [B, T]
    if method in ("mean", "last+mean", "all_mean"):
        if method != "all_mean" and completion_start is not None:
            positions = torch.arange(hidden.size(1), device=hidden.device)  # [T]
            mask = mask * (positions[None, :] >= completion_start[:, None]).to(hidden.dtype)  # [B, T]
        mean = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)  # [B, H]
        if method != "last+mean":
            return mean
    last_index = attention_mask.sum(dim=1) - 1  # [B]
    last = hidden[torch.arange(hidden.size(0), device=hidden.device), last_index]  # [B, H]
    return last if method == "last" else torch.cat([last, mean], dim=-1)  # [B, H] or [B, 2H]


def pooled_features(
    backbone: nn.Module,
    pooling: Pooling,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    token_type_ids: torch.Tensor | None = None,
    completion_start: torch.Tensor | None = None,
) -> torch.Tensor:
    """The backbone run once and its states pooled as `pooling` says: [B, T] -> [B, F]."""
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if token_type_ids is not None:
        kwargs["token_type_ids"] = token_type_ids
    if pooling.layers in ((), (depth(backbone),)):  # the (cut) backbone's output is the one layer read
        states = [backbone(**kwargs).last_hidden_state]  # [B, T, H]
    else:
        hidden = backbone(**kwargs, output_hidden_states=True).hidden_states  # (N' + 1) x [B, T, H]
        states = [hidden[layer] for layer in pooling.layers]
    return torch.cat([pool(h, attention_mask, completion_start, pooling.method) for h in states], dim=-1)  # [B, F]


def block_list(backbone: nn.Module) -> nn.ModuleList | None:
    """The backbone's stack of transformer blocks (decoders: `.layers`; BERT-like: `.encoder.layer`)."""
    for owner, name in ((backbone, "layers"), (getattr(backbone, "encoder", None), "layer")):
        blocks = getattr(owner, name, None) if owner is not None else None
        if isinstance(blocks, nn.ModuleList):
            return blocks
    return None


def depth(backbone: nn.Module) -> int:
    blocks = block_list(backbone)
    return len(blocks) if blocks is not None else int(backbone.config.num_hidden_layers)


def truncate(backbone: nn.Module, pooling: Pooling) -> nn.Module:
    """Cut `backbone` in place after the deepest layer `pooling` reads, so that its output is
    that layer's hidden state (before the final norm, which belongs to the last block only).
    A pooling that reads the last layer, or none, leaves the backbone whole."""
    if not pooling.layers:
        return backbone
    n, deepest = depth(backbone), max(pooling.layers)
    if not 0 < deepest <= n:
        raise ValueError(f"pooling reads layer {deepest}, but the backbone has layers 1..{n}")
    if deepest == n:
        return backbone
    blocks = block_list(backbone)
    if blocks is None:
        raise ValueError(f"{type(backbone).__name__}: cannot find its transformer blocks to read layer {deepest}")
    owner = backbone if getattr(backbone, "layers", None) is blocks else backbone.encoder
    setattr(owner, "layers" if owner is backbone else "layer", nn.ModuleList(list(blocks)[:deepest]))
    if owner is backbone and isinstance(getattr(backbone, "norm", None), nn.Module):
        backbone.norm = nn.Identity()  # layer `deepest`'s own output, as hidden_states[deepest] reads it
    backbone.config.num_hidden_layers = deepest
    return backbone
