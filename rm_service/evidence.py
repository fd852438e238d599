"""The evidence a promotion is decided on: candidate against parent, pair by pair.

Accuracy on a handful of pairs ties constantly (0.75 vs 0.75 on 12 pairs says nothing), so the
measure is continuous: each held-out pair's Bradley-Terry log-likelihood under both models,

    ll_i(model) = log sigmoid(r(x_i, y_chosen) - r(x_i, y_rejected))        [nats]
    gain_i      = ll_i(candidate) - ll_i(parent)

and the effect is the mean gain per pair with its t-interval over pairs (paired: both models
score the same pairs, so what the pairs have in common cancels). A positive gain means the
candidate puts more probability on what the labeler chose. Pairs are grouped by where they
come from: the dataset's held-out pairs (`human`) and labels of the policy's own samples
(`onpolicy`), the distribution that matters now; thumbs and session outcomes people gave the
policy's sessions (`feedback`, per label: train.feedback_gate); `combined` weighs the human
group against the policy's by a share.

`labels_needed` turns an undecided on-policy effect into a label budget: how many on-policy
pairs the interval would need to exclude zero with 80% power if the effect is what it looks
like (never below a smallest effect worth detecting).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np
from scipy import stats

POWER = 0.8


def pair_loglik(r_chosen: np.ndarray, r_rejected: np.ndarray) -> np.ndarray:
    """[N] log sigmoid(r_chosen - r_rejected): the log-probability the model gives the label."""
    delta = np.asarray(r_chosen, dtype=np.float64) - np.asarray(r_rejected, dtype=np.float64)  # [N]
    return -np.logaddexp(0.0, -delta)


@dataclass(frozen=True)
class Effect:
    """The candidate's mean per-pair log-likelihood gain over its parent on one group of pairs."""

    pairs: int
    gain: float  # mean of gain_i, nats per pair
    low: float  # the interval at the decision's confidence (-inf/inf: too few pairs to say)
    high: float
    sd: float  # standard deviation of gain_i (what the label budget is computed from)
    accuracy: float  # the candidate's accuracy on these pairs (ties half), for people
    parent_accuracy: float

    @property
    def better(self) -> bool:
        return self.low > 0

    @property
    def worse(self) -> bool:
        return self.high < 0

    def text(self, unit: str = "pair") -> str:
        return (
            f"{self.gain:+.4f} nats/{unit} [{self.low:+.4f}, {self.high:+.4f}] on {self.pairs} {unit}s "
            f"(accuracy {self.accuracy:.3f} vs {self.parent_accuracy:.3f})"
        )

    def as_metrics(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}_{k}": float(v) for k, v in asdict(self).items()}


def _accuracy(delta: np.ndarray) -> float:
    return float(np.mean((delta > 0) + 0.5 * (delta == 0))) if delta.size else float("nan")


@lru_cache(maxsize=4096)
def t_quantile(confidence: float, df: int) -> float:
    """The two-sided t quantile (cached: the rule's simulation asks for the same few often)."""
    return float(stats.t.ppf(0.5 + confidence / 2, df))


@lru_cache(maxsize=64)
def z_quantile(confidence: float) -> float:
    return float(stats.norm.ppf(0.5 + confidence / 2))


def t_interval(values: np.ndarray, confidence: float) -> tuple[float, float, float, float]:
    """(mean, low, high, sd) of `values` [N]: the two-sided t-interval of the mean. Fewer than
    two values, or all equal to one another when there are two, say nothing: (-inf, inf)."""
    n = values.size
    mean = float(values.mean()) if n else float("nan")
    sd = float(values.std(ddof=1)) if n > 1 else float("nan")
    if n < 2 or not sd > 0:
        return mean, -math.inf, math.inf, sd
    half = t_quantile(confidence, n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half, sd


def effect(
    candidate: tuple[np.ndarray, np.ndarray], parent: tuple[np.ndarray, np.ndarray], confidence: float
) -> Effect | None:
    """The gain of `candidate` (r_chosen, r_rejected) [N] over `parent` on the same N pairs;
    None when there are no pairs."""
    if len(candidate[0]) == 0:
        return None
    return gain_effect(
        pair_loglik(*candidate) - pair_loglik(*parent),
        _accuracy(candidate[0] - candidate[1]),
        _accuracy(parent[0] - parent[1]),
        confidence,
    )


def gain_effect(gains: np.ndarray, accuracy: float, parent_accuracy: float, confidence: float) -> Effect | None:
    """The Effect of per-item log-likelihood gains [N] (candidate minus parent, paired); None
    when there are none. Pairs and feedback labels (train.feedback_gate) both end here."""
    if len(gains) == 0:
        return None
    mean, low, high, sd = t_interval(np.asarray(gains, dtype=np.float64), confidence)
    return Effect(len(gains), mean, low, high, sd, accuracy, parent_accuracy)


def _usable(e: Effect | None) -> bool:
    return e is not None and e.pairs > 1 and e.sd > 0


def combined(
    human: Effect | None,
    onpolicy: Effect | None,
    share: float,
    confidence: float,
    feedback: Effect | None = None,
) -> Effect | None:
    """share x the policy's evidence + (1 - share) x the human gain, with a normal interval from
    the groups' standard errors (independent items). The policy's evidence is its on-policy
    pairs and its feedback labels (thumbs and outcomes on its sessions), the share split between
    them by their counts. None unless the human group and one of the policy's groups have items
    enough for an interval (a group without is left out)."""
    policy = [e for e in (onpolicy, feedback) if e is not None and _usable(e)]
    if human is None or not _usable(human) or not policy:
        return None
    n_policy = sum(e.pairs for e in policy)
    groups = [(human, 1 - share)] + [(e, share * e.pairs / n_policy) for e in policy]
    gain = sum(w * e.gain for e, w in groups)
    se = math.sqrt(sum((w * e.sd) ** 2 / e.pairs for e, w in groups))
    half = z_quantile(confidence) * se
    pairs = sum(e.pairs for e, _ in groups)
    accuracy = sum(e.accuracy * e.pairs for e, _ in groups) / pairs
    parent = sum(e.parent_accuracy * e.pairs for e, _ in groups) / pairs
    return Effect(pairs, gain, gain - half, gain + half, float("nan"), accuracy, parent)


def pairs_needed(e: Effect | None, confidence: float, min_effect: float) -> float:
    """On-policy pairs at which a t-interval of an effect this size (at least `min_effect`)
    excludes zero with POWER; NaN without an estimate of the spread."""
    if e is None or not e.sd > 0:
        return float("nan")
    z = z_quantile(confidence) + float(stats.norm.ppf(POWER))
    size = max(abs(e.gain), min_effect)
    return float(math.ceil((z * e.sd / size) ** 2))
