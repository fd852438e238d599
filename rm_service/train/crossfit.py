"""Cross-fitting: every new on-policy label is evidence, and every one is trained on.

A held-out share of the policy's labels spends most of a small budget on training and decides
on the few left over (2 to 12 pairs in a demo run). Instead the new on-policy pairs (labels of
the policy's samples since the parent's snapshot) are split into k folds by conversation; for
each fold the heads are refitted on everything else and score that fold. Each new pair then
has the reward of a model that never saw it, a model that differs from the version being
registered only by 1/k of the new labels (so the estimate is slightly pessimistic), while the
version itself trains on all of them. Head-mode refits take seconds: the features are cached.
"""

from __future__ import annotations

import numpy as np

from rm_service.train.feedback import FeedbackData
from rm_service.train.heads import HeadFit, PairData, fit_heads, fold_of


def crossfit_rewards(
    data: PairData,
    evidence: np.ndarray,
    folds: int,
    fit: HeadFit,
    ensemble_size: int,
    seed: int,
    feedback: FeedbackData | None = None,
    term_weights: tuple[float, float, float] = (1.0, 1.0, 1.0),
) -> tuple[np.ndarray, np.ndarray]:
    """(r_chosen, r_rejected) [n] of the rows `evidence` ([N] bool over `data`'s pairs), each
    from heads refitted without its fold: every pair of the fold's conversations left out
    (a conversation's pairs share a prompt). `fit` is the full fit: its penalty, and its heads
    as the refits' starting point (the optimum moves little)."""
    fold = np.array([fold_of(c, folds) for c in data.conversations])  # [N]
    r_chosen, r_rejected = np.zeros(int(evidence.sum())), np.zeros(int(evidence.sum()))
    where = np.flatnonzero(evidence)  # rows of the evidence pairs, in order
    for k in np.unique(fold[evidence]):
        held = fold == k  # [N]: the fold's conversations, evidence or not
        refit = fit_heads(
            data.rows(~held),
            ensemble_size,
            fit.l2,
            seed,
            (fit.weight, fit.bias),
            feedback=feedback,
            term_weights=term_weights,
        )
        rows = where[fold[where] == k]
        out = np.isin(where, rows)  # positions among the evidence pairs
        r_chosen[out] = (data.x_w[rows] @ refit.weight.T + refit.bias).mean(1)  # [m]: ensemble mean
        r_rejected[out] = (data.x_l[rows] @ refit.weight.T + refit.bias).mean(1)
    return r_chosen, r_rejected
