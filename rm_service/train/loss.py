"""The Bradley-Terry reward-model loss (InstructGPT eq. 1, with two common extras).

    loss = -log sigmoid(r_chosen - r_rejected - margin) + center_coef * (r_chosen + r_rejected)^2

`margin` comes from label strength (Llama 2's margin loss); the centring term keeps rewards
near zero mean, since the pairwise loss only fixes differences.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    margin: torch.Tensor | None = None,
    center_coef: float = 0.0,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean loss over pairs. r_chosen, r_rejected: [N] or [N, K] (K ensemble members)."""
    logits = r_chosen - r_rejected  # [N(, K)]
    if margin is not None:
        logits = logits - margin.reshape(-1, *([1] * (logits.dim() - 1)))
    loss = -F.logsigmoid(logits)  # [N(, K)]
    if center_coef:
        loss = loss + center_coef * (r_chosen + r_rejected) ** 2
    if weights is not None:
        loss = loss * weights  # bootstrap counts, [N, K]
        return loss.sum() / weights.sum().clamp_min(1)
    return loss.mean()


def bootstrap_counts(n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """How often each of n pairs appears in each of k ensemble members' resamples: Poisson(1)
    counts (the online bootstrap), used as `weights` above; all ones for a single member."""
    if k == 1:
        return torch.ones(n, 1)
    return torch.poisson(torch.ones(n, k), generator=generator)  # [N, K]
