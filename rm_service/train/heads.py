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

Feedback beyond pairs (train.feedback, docs/feedback.md) adds, per member, the logistic loss of
sigmoid(theta . z_t + b - b_thumb) against each thumb and of sigmoid(V - b_outcome), V the sum
of the session's turn rewards, against each outcome; the offsets (and b, when outcomes fix it)
are fitted with theta. Without feedback the fit is the pairs-only one above. With
`separate_session` the outcomes fit a session head of their own (V the sum of its per-turn
credits) and the turn reward fits pairs and thumbs: two exact fits (train.feedback says why).

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
from dataclasses import dataclass, field

import numpy as np
import torch

from rm_service.train.feedback import FeedbackData, heldout_loss
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
    offsets: dict[str, float] = field(
        default_factory=dict
    )  # feedback terms: thumb_offset, outcome_offset (raw reward units)
    session: tuple[np.ndarray, np.ndarray] | None = None  # a separate session head: [K, F], [K] (raw features)


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
        return PairData(
            self.x_w[mask],
            self.x_l[mask],
            self.weight[mask],
            None if self.margin is None else self.margin[mask],
            [c for c, keep in zip(self.conversations, mask, strict=True) if keep],
        )


def fit_heads(
    data: PairData,
    ensemble_size: int,
    l2: float,
    seed: int = 0,
    init: tuple[np.ndarray, np.ndarray] | None = None,
    max_iter: int = 200,
    dtype: torch.dtype = torch.float64,
    feedback: FeedbackData | None = None,
    term_weights: tuple[float, float, float] = (1.0, 1.0, 1.0),
    separate_session: bool = False,
) -> HeadFit:
    """K heads on `data` (bootstrap resamples when K > 1); `init` ([K, F], [K]) starts L-BFGS
    from a parent's heads (the optimum is the same, it is only reached sooner). Cross-validation
    fits in float32, which is twice as fast and chooses the same; the served heads in float64.
    `feedback` (thumbs, sessions: train.feedback) adds its terms, weighted by `term_weights`
    (pairs, thumbs, outcomes), and fits their offsets with the heads (HeadFit.offsets).
    `separate_session`: outcomes fit a session head of their own (HeadFit.session) when the run
    also has pairs or thumbs for the turn reward."""
    fb = feedback if feedback is not None and not feedback.empty else None
    if separate_session and fb is not None and len(fb.y_outcome) and (len(data.x_w) or len(fb.y_thumb)):
        start = time.monotonic()
        turn = _fit(data, ensemble_size, l2, seed, init, max_iter, dtype, fb.without_outcomes(), term_weights)
        no_pairs = data.rows(np.zeros(len(data.x_w), dtype=bool))
        session = _fit(no_pairs, ensemble_size, l2, seed, None, max_iter, dtype, fb.outcomes_only(), term_weights)
        return HeadFit(
            turn.weight, turn.bias, turn.steps + session.steps, l2, time.monotonic() - start,
            {**turn.offsets, **session.offsets}, (session.weight, session.bias),
        )  # fmt: skip
    return _fit(data, ensemble_size, l2, seed, init, max_iter, dtype, fb, term_weights)


def _fit(
    data: PairData,
    ensemble_size: int,
    l2: float,
    seed: int,
    init: tuple[np.ndarray, np.ndarray] | None,
    max_iter: int,
    dtype: torch.dtype,
    fb: FeedbackData | None,
    term_weights: tuple[float, float, float],
) -> HeadFit:
    """One exact fit of K heads on pairs and the feedback terms `fb` holds (fit_heads)."""
    start = time.monotonic()
    fb = fb if fb is not None and not fb.empty else None
    x_w, x_l = torch.from_numpy(data.x_w).to(dtype), torch.from_numpy(data.x_l).to(dtype)  # [N, F]
    items = torch.cat([x_w, x_l])  # [2N, F]
    item_weight = np.concatenate([data.weight, data.weight])  # [2N]
    if fb is not None:  # feedback turns join the items the features are standardised and centred on
        items = torch.cat(
            [items, torch.from_numpy(fb.x_thumb).to(dtype), torch.from_numpy(fb.x_turn).to(dtype)]
        )  # [2N + T + U, F]
        item_weight = np.concatenate([item_weight, np.ones(len(fb.x_thumb) + len(fb.x_turn))])
    w_items = torch.from_numpy(item_weight).to(dtype)[:, None] / (float(item_weight.sum()) or 1.0)  # [I, 1]
    mu = (items * w_items).sum(0)  # [F]: the weighted statistics of the items the fit sees
    sigma = (((items - mu) ** 2) * w_items).sum(0).sqrt()  # [F]
    # Near-constant features would get weights ~1/sigma once the scaling is folded back;
    # a floor at a tenth of the median keeps the served head well-conditioned.
    sigma = sigma.clamp_min(max(0.1 * float(sigma.median()), 1e-6))
    delta = (x_w - x_l) / sigma  # [N, F] standardised differences (the mean cancels)
    counts = bootstrap_counts(len(delta), ensemble_size, torch.Generator().manual_seed(seed)).to(dtype)  # [N, K]
    c = counts * torch.from_numpy(data.weight).to(dtype)[:, None]  # [N, K]
    m = (
        torch.from_numpy(data.margin).to(dtype) if data.margin is not None else torch.zeros(len(delta), dtype=dtype)
    )  # [N]
    theta = torch.zeros(ensemble_size, delta.shape[1], dtype=dtype)  # [K, F]
    if init is not None and init[0].shape == (ensemble_size, delta.shape[1]):
        theta = torch.from_numpy(init[0]).to(dtype) * sigma  # W x = (W sigma) z + const
    theta.requires_grad_(True)
    terms = _FeedbackTerms(fb, mu, sigma, ensemble_size, seed, dtype) if fb is not None else None
    params = [theta] + ([terms.extra] if terms is not None else [])
    opt = torch.optim.LBFGS(
        params,
        max_iter=max_iter,
        tolerance_grad=1e-7,
        tolerance_change=1e-10,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def objective() -> torch.Tensor:
        opt.zero_grad()
        margins = delta @ theta.T - m[:, None]  # [N, K]
        loss = (torch.nn.functional.softplus(-margins) * c).sum(0) / c.sum(0).clamp_min(1e-12)  # [K]
        if terms is None:
            total = loss.sum() + l2 * (theta * theta).sum()
        else:  # pairs, thumbs and outcomes, each a mean over its own items, weighted
            total = (
                term_weights[0] * loss.sum()
                + terms.loss(theta, term_weights[1], term_weights[2])
                + l2 * (theta * theta).sum()
            )
        total.backward()
        return total

    opt.step(objective)
    steps = int(opt.state[opt._params[0]].get("n_iter", 0))
    offsets: dict[str, float] = {}
    with torch.no_grad():
        weight = theta.detach() / sigma  # [K, F]: W x = theta (x / sigma)
        bias = -((items @ weight.T) * w_items).sum(0)  # [K]: each member's rewards centred on the training items
        if terms is not None:
            bias, offsets = terms.served(weight, mu)
    return HeadFit(weight.float().numpy(), bias.float().numpy(), steps, l2, time.monotonic() - start, offsets)


class _FeedbackTerms:
    """The thumb and outcome terms of the head objective (train.feedback states them), on
    standardised features; `extra` [K, 3] holds per member the reward's constant b (free only
    when outcomes fix it: a session's value sums it once per turn), b_thumb and b_outcome."""

    def __init__(self, fb: FeedbackData, mu: torch.Tensor, sigma: torch.Tensor, k: int, seed: int, dtype: torch.dtype):
        z = lambda x: (torch.from_numpy(x).to(dtype) - mu) / sigma
        self.z_thumb, self.y_thumb = z(fb.x_thumb), torch.from_numpy(fb.y_thumb).to(dtype)  # [T, F], [T]
        self.z_turn, self.y_outcome = z(fb.x_turn), torch.from_numpy(fb.y_outcome).to(dtype)  # [U, F], [S]
        self.session = torch.from_numpy(fb.session)  # [U]
        self.c_thumb = bootstrap_counts(len(fb.y_thumb), k, torch.Generator().manual_seed(seed + 1)).to(dtype)  # [T, K]
        self.c_outcome = bootstrap_counts(len(fb.y_outcome), k, torch.Generator().manual_seed(seed + 2)).to(
            dtype
        )  # [S, K]
        self.has_outcomes = len(fb.y_outcome) > 0
        self.extra = torch.zeros(k, 3, dtype=dtype, requires_grad=True)  # [K, 3]: b, b_thumb, b_outcome

    def _b(self) -> torch.Tensor:
        return self.extra[:, 0] if self.has_outcomes else torch.zeros_like(self.extra[:, 0])  # [K]

    def loss(self, theta: torch.Tensor, w_thumb: float, w_outcome: float) -> torch.Tensor:
        total = 1e-6 * (self.extra * self.extra).sum()  # keeps the offsets finite when a class is absent
        b = self._b()
        if len(self.y_thumb):
            logit = self.z_thumb @ theta.T + b - self.extra[:, 1]  # [T, K]
            total = total + w_thumb * _bce(logit, self.y_thumb, self.c_thumb)
        if self.has_outcomes:
            turns = self.z_turn @ theta.T + b  # [U, K]
            value = torch.zeros(len(self.y_outcome), turns.shape[1], dtype=turns.dtype).index_add(
                0, self.session, turns
            )  # [S, K]: sums
            total = total + w_outcome * _bce(value - self.extra[:, 2], self.y_outcome, self.c_outcome)
        return total

    def served(self, weight: torch.Tensor, mu: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """The raw-feature bias [K] (r = W x + bias equals the fit's theta z + b) and the offsets,
        ensemble means, in the raw rewards' units."""
        bias = self._b().detach() - weight @ mu  # [K]
        offsets = {}
        if len(self.y_thumb):
            offsets["thumb_offset"] = float(self.extra[:, 1].mean())
        if self.has_outcomes:
            offsets["outcome_offset"] = float(self.extra[:, 2].mean())
        return bias, offsets


def _bce(logit: torch.Tensor, y: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Sum over members of each member's count-weighted mean BCE-with-logits (targets in [0, 1])."""
    loss = torch.nn.functional.softplus(logit) - y[:, None] * logit  # [M, K]
    return ((loss * counts).sum(0) / counts.sum(0).clamp_min(1e-12)).sum()


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
    best = sorted(screen, key=lambda name: screen[name])[:finalists]
    table = [(name, default_l2, loss) for name, loss in screen.items() if name not in best]
    table += [
        (name, l2, loss)
        for name in best
        for l2, loss in cv_losses(options[name], tuple(sorted({*L2_GRID, default_l2}))).items()
    ]
    name, l2, loss = min(table, key=lambda row: row[2])
    log.info(
        "head selection over %d options x %d penalties: %s, l2 %g (CV loss %.4f)",
        len(options),
        len(L2_GRID),
        name,
        l2,
        loss,
    )
    return Selection(name, l2, loss, table)


def cv_feedback_losses(
    fb: FeedbackData,
    no_pairs: PairData,
    grid: tuple[float, ...],
    term_weights: tuple[float, float],
    separate_session: bool = False,
) -> dict[float, float]:
    """Weighted thumb and outcome BCE of one head over FOLDS folds split by conversation group,
    for every penalty of `grid` (warm-started along the path, as cv_losses does for pairs)."""
    total, count = dict.fromkeys(grid, 0.0), 0.0
    for k in range(FOLDS):
        train, test = fb.rows(lambda g, k=k: fold_of(g) != k), fb.rows(lambda g, k=k: fold_of(g) == k)
        if train.empty or test.empty:
            continue
        start, n = None, 0.0
        for l2 in sorted(grid, reverse=True):
            fit = fit_heads(
                no_pairs,
                1,
                l2,
                init=start,
                max_iter=60,
                dtype=torch.float32,
                feedback=train,
                term_weights=(1.0, *term_weights),
                separate_session=separate_session,
            )
            start = (fit.weight, fit.bias)
            loss, n = heldout_loss(test, fit.weight, fit.bias, fit.offsets, term_weights, fit.session)
            total[l2] += loss
        count += n
    return {l2: loss / max(count, 1e-12) for l2, loss in total.items()}


def select_feedback_head(
    options: dict[str, FeedbackData],
    no_pairs: dict[str, PairData],
    default_l2: float,
    term_weights: tuple[float, float],
    finalists: int = 3,
    separate_session: bool = False,
) -> Selection:
    """select_head for a run with too few pairs to cross-validate but with thumbs or outcomes:
    the feature set and penalty with the lowest cross-validated feedback loss."""
    first = next(iter(options.values()))
    groups = set(first.thumb_group) | set(first.session_group)
    if len(first.y_thumb) + len(first.y_outcome) < MIN_PAIRS_FOR_CV or len({fold_of(g) for g in groups}) < 2:
        name = next(iter(options))
        log.info("too little feedback for %d-fold selection; %s with l2 %g", FOLDS, name, default_l2)
        return Selection(name, default_l2, float("nan"), [])
    screen = {
        name: cv_feedback_losses(fb, no_pairs[name], (default_l2,), term_weights, separate_session)[default_l2]
        for name, fb in options.items()
    }
    best = sorted(screen, key=lambda name: screen[name])[:finalists]
    table = [(name, default_l2, loss) for name, loss in screen.items() if name not in best]
    grid = tuple(sorted({*L2_GRID, default_l2}))
    table += [
        (name, l2, loss)
        for name in best
        for l2, loss in cv_feedback_losses(options[name], no_pairs[name], grid, term_weights, separate_session).items()
    ]
    name, l2, loss = min(table, key=lambda row: row[2])
    log.info(
        "head selection on feedback over %d options x %d penalties: %s, l2 %g (CV loss %.4f)",
        len(options),
        len(grid),
        name,
        l2,
        loss,
    )
    return Selection(name, l2, loss, table)
