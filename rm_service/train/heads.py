"""Head mode: fit K linear score heads on frozen, cached features with the Bradley-Terry loss.

Each head k sees its own bootstrap resample of the training pairs (Poisson(1) counts, the
online bootstrap), so the spread of the K rewards estimates the model's uncertainty.
Features are standardised with training statistics; the fitted affine map is folded back
into W and b so the served head reads raw features.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from rm_service.train.loss import bootstrap_counts, bradley_terry_loss


@dataclass
class HeadFit:
    weight: np.ndarray  # [K, H], applies to raw features
    bias: np.ndarray  # [K]
    steps: int
    best_validation_loss: float
    seconds: float


def fit_heads(
    h_chosen: np.ndarray,
    h_rejected: np.ndarray,
    validation: tuple[np.ndarray, np.ndarray] | None,
    ensemble_size: int,
    learning_rate: float,
    weight_decay: float,
    batch_size: int,
    max_steps: int,
    patience: int,
    center_coef: float = 0.0,
    margin: np.ndarray | None = None,
    seed: int = 0,
    deadline: float | None = None,
    init: tuple[np.ndarray, np.ndarray] | None = None,
) -> HeadFit:
    """h_chosen, h_rejected: [N, H] training features; validation: ([M, H], [M, H]) for early stopping.

    init: (weight [K, H], bias [K]) of heads to start from (a warm start from the parent
    version) instead of small random weights; early stopping can then keep them unchanged.
    """
    start = time.monotonic()
    gen = torch.Generator().manual_seed(seed)
    x_w, x_l = torch.from_numpy(h_chosen).float(), torch.from_numpy(h_rejected).float()  # [N, H]
    mu = torch.cat([x_w, x_l]).mean(0)  # [H]
    sigma = torch.cat([x_w, x_l]).std(0)  # [H]
    # Near-constant features would get weights ~1/sigma once the scaling is folded back;
    # a floor at a tenth of the median keeps the served head well-conditioned.
    sigma = sigma.clamp_min(max(0.1 * float(sigma.median()), 1e-6))  # [H]
    z_w, z_l = (x_w - mu) / sigma, (x_l - mu) / sigma  # [N, H]
    n, hidden = z_w.shape
    counts = bootstrap_counts(n, ensemble_size, gen)  # [N, K]
    m = torch.from_numpy(margin).float() if margin is not None else None  # [N]

    w = torch.nn.Parameter(torch.randn(ensemble_size, hidden, generator=gen) * 0.01)  # [K, H]
    b = torch.nn.Parameter(torch.zeros(ensemble_size))  # [K]
    if init is not None:  # W x + c = (W * sigma) z + (c + W mu): the same heads on standardised features
        w0, b0 = torch.from_numpy(init[0]).float(), torch.from_numpy(init[1]).float()  # [K, H], [K]
        with torch.no_grad():
            w.copy_(w0 * sigma)
            b.copy_(b0 + w0 @ mu)
    opt = torch.optim.AdamW([w, b], lr=learning_rate, weight_decay=weight_decay)

    def rewards(z: torch.Tensor) -> torch.Tensor:
        return z @ w.T + b  # [N, H] -> [N, K]

    if validation is not None:
        vz_w = (torch.from_numpy(validation[0]).float() - mu) / sigma
        vz_l = (torch.from_numpy(validation[1]).float() - mu) / sigma
    best = (float("inf"), w.detach().clone(), b.detach().clone(), 0)
    if validation is not None and init is not None:  # the warm start is a candidate too
        with torch.no_grad():
            best = (bradley_terry_loss(rewards(vz_w).mean(1), rewards(vz_l).mean(1)).item(), *best[1:])
    step = 0
    for step in range(1, max_steps + 1):
        idx = torch.randint(0, n, (min(batch_size, n),), generator=gen)  # [B]
        loss = bradley_terry_loss(rewards(z_w[idx]), rewards(z_l[idx]), None if m is None else m[idx], center_coef, counts[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if validation is not None and (step % 10 == 0 or step == max_steps):
            with torch.no_grad():
                val_loss = bradley_terry_loss(rewards(vz_w).mean(1), rewards(vz_l).mean(1)).item()
            if val_loss < best[0]:
                best = (val_loss, w.detach().clone(), b.detach().clone(), step)
            elif step - best[3] >= patience:
                break
        if deadline is not None and time.monotonic() > deadline:
            break
    if validation is None:
        best = (float("nan"), w.detach().clone(), b.detach().clone(), step)
    _, w_best, b_best, _ = best
    # Fold the standardisation in: W z + b = (W / sigma) x + (b - W (mu / sigma)).
    weight = w_best / sigma  # [K, H]
    bias = b_best - weight @ mu  # [K]
    return HeadFit(weight.numpy(), bias.numpy(), step, best[0], time.monotonic() - start)
