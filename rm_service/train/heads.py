"""Head mode: K linear score heads on frozen features, fitted exactly (L-BFGS) with the
Bradley-Terry loss and an L2 penalty; the features and the penalty chosen by cross-validation.

Per member k, on standardised features z (training mean and std):

    loss_k(theta) = sum_i c_ik w_i softplus(-(theta . (z_w,i - z_l,i) - m_i)) / sum_i c_ik w_i + l2 * |theta|^2

c_ik are Poisson(1) bootstrap counts (the online bootstrap: the K members disagree where the
data are thin, and their spread is the served uncertainty), w_i per-pair weights (fresh
on-policy labels can count more), m_i margins from label strength. The problem is convex:
the same data give the same heads, so a retrain moves only when its labels do. The bias,
which the pairwise loss leaves free, centres each member's rewards on the training items
(what the centring term of full mode asks for). The standardisation is folded back, so the
served head reads raw features.

Selection (`select_head`), by the weighted BT loss of 5-fold cross-validation over the
training pairs, split by conversation: every candidate feature set (a layer's last token, its
completion mean, both, or several layers) is screened at the default penalty; the best few are
then scored over every penalty in L2_GRID; the lowest loss wins. With too few pairs for folds,
the default penalty is used: a fit is always regularised.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from rm_service.train.loss import bootstrap_counts

log = logging.getLogger(__name__)
L2_GRID = (0.03, 0.1, 0.3, 1.0, 3.0)  # on standardised features; 0.3 won on SmolLM2 / HH-RLHF
FOLDS = 5
MIN_PAIRS_FOR_CV = 50


@dataclass
class HeadFit:
    weight: np.ndarray  # [K, F], applies to raw features
    bias: np.ndarray  # [K]
    steps: int  # L-BFGS iterations
    l2: float
    seconds: float


@dataclass
class PairData:
    """Features of the training pairs: chosen and rejected [N, F], weights and margins [N],
    and each pair's conversation (folds never split one)."""

    x_w: np.ndarray
    x_l: np.ndarray
    weight: np.ndarray
    margin: np.ndarray | None
    conversations: list[str]

    def rows(self, mask: np.ndarray) -> PairData:
        return PairData(self.x_w[mask], self.x_l[mask], self.weight[mask], None if self.margin is None else self.margin[mask],
                        [c for c, keep in zip(self.conversations, mask) if keep])


def fit_heads(data: PairData, ensemble_size: int, l2: float, seed: int = 0, init: tuple[np.ndarray, np.ndarray] | None = None,
              max_iter: int = 200, dtype: torch.dtype = torch.float64) -> HeadFit:
    """K heads on `data` (bootstrap resamples when K > 1); `init` ([K, F], [K]) starts L-BFGS
    from a parent's heads (the optimum is the same, it is only reached sooner). Cross-validation
    fits in float32, which is twice as fast and chooses the same; the served heads in float64."""
    start = time.monotonic()
    x_w, x_l = torch.from_numpy(data.x_w).to(dtype), torch.from_numpy(data.x_l).to(dtype)  # [N, F]
    items = torch.cat([x_w, x_l])  # [2N, F]
    w_items = torch.from_numpy(np.concatenate([data.weight, data.weight])).to(dtype)[:, None] / (2 * float(data.weight.sum()) or 1.0)  # [2N, 1]
    mu = (items * w_items).sum(0)  # [F]: the weighted statistics of the items the fit sees
    sigma = (((items - mu) ** 2) * w_items).sum(0).sqrt()  # [F]
    # Near-constant features would get weights ~1/sigma once the scaling is folded back;
    # a floor at a tenth of the median keeps the served head well-conditioned.
    sigma = sigma.clamp_min(max(0.1 * float(sigma.median()), 1e-6))
    delta = (x_w - x_l) / sigma  # [N, F] standardised differences (the mean cancels)
    counts = bootstrap_counts(len(delta), ensemble_size, torch.Generator().manual_seed(seed)).to(dtype)  # [N, K]
    c = counts * torch.from_numpy(data.weight).to(dtype)[:, None]  # [N, K]
    m = torch.from_numpy(data.margin).to(dtype) if data.margin is not None else torch.zeros(len(delta), dtype=dtype)  # [N]
    theta = torch.zeros(ensemble_size, delta.shape[1], dtype=dtype)  # [K, F]
    if init is not None and init[0].shape == (ensemble_size, delta.shape[1]):
        theta = torch.from_numpy(init[0]).to(dtype) * sigma  # W x = (W sigma) z + const
    theta.requires_grad_(True)
    opt = torch.optim.LBFGS([theta], max_iter=max_iter, tolerance_grad=1e-7, tolerance_change=1e-10, history_size=20,
                            line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        opt.zero_grad()
        margins = delta @ theta.T - m[:, None]  # [N, K]
        loss = (torch.nn.functional.softplus(-margins) * c).sum(0) / c.sum(0).clamp_min(1e-12)  # [K]
        total = loss.sum() + l2 * (theta * theta).sum()
        total.backward()
        return total

    opt.step(objective)
    steps = int(opt.state[opt._params[0]].get("n_iter", 0))
    with torch.no_grad():
        weight = theta.detach() / sigma  # [K, F]: W x = theta (x / sigma)
        bias = -((items @ weight.T) * w_items).sum(0)  # [K]: each member's rewards centred on the training items
    return HeadFit(weight.float().numpy(), bias.float().numpy(), steps, l2, time.monotonic() - start)


def fold_of(conversation_id: str, folds: int = FOLDS) -> int:
    return int.from_bytes(hashlib.sha256(f"fold:{conversation_id}".encode()).digest()[:4], "big") % folds


def cv_losses(data: PairData, grid: tuple[float, ...] = L2_GRID) -> dict[float, float]:
    """Weighted BT loss of one head over FOLDS folds split by conversation, for every penalty
    of `grid`; within a fold the penalties run from strongest to weakest, each fit starting
    from the last (a warm start along the regularisation path)."""
    folds = np.array([fold_of(cid) for cid in data.conversations])
    total, weight = dict.fromkeys(grid, 0.0), 0.0
    for k in range(FOLDS):
        held = folds == k
        if not held.any() or held.all():
            continue
        train, test = data.rows(~held), data.rows(held)
        start = None
        for l2 in sorted(grid, reverse=True):
            fit = fit_heads(train, 1, l2, init=start, max_iter=60, dtype=torch.float32)
            start = (fit.weight, fit.bias)
            d = (test.x_w - test.x_l) @ fit.weight[0]  # [n]
            total[l2] += float((np.logaddexp(0.0, -d) * test.weight).sum())
        weight += float(test.weight.sum())
    return {l2: loss / max(weight, 1e-12) for l2, loss in total.items()}


@dataclass
class Selection:
    name: str  # which features, e.g. "last+mean@18"
    l2: float
    cv_loss: float
    table: list[tuple[str, float, float]]  # every (features, l2, cv loss) tried


def select_head(options: dict[str, PairData], default_l2: float, finalists: int = 3) -> Selection:
    """The feature set and penalty with the lowest cross-validated loss."""
    n = len(next(iter(options.values())).conversations)
    if n < MIN_PAIRS_FOR_CV or len({fold_of(c) for c in next(iter(options.values())).conversations}) < 2:
        name = next(iter(options))
        log.info("%d training pairs: too few for %d-fold selection; %s with l2 %g", n, FOLDS, name, default_l2)
        return Selection(name, default_l2, float("nan"), [])
    screen = {name: cv_losses(data, (default_l2,))[default_l2] for name, data in options.items()}
    best = sorted(screen, key=screen.get)[:finalists]
    table = [(name, default_l2, loss) for name, loss in screen.items() if name not in best]
    table += [(name, l2, loss) for name in best for l2, loss in cv_losses(options[name], tuple(sorted({*L2_GRID, default_l2}))).items()]
    name, l2, loss = min(table, key=lambda row: row[2])
    log.info("head selection over %d options x %d penalties: %s, l2 %g (CV loss %.4f)", len(options), len(L2_GRID), name, l2, loss)
    return Selection(name, l2, loss, table)
