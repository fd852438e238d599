"""The evidence a promotion is decided on: candidate against parent, pair by pair.

Accuracy on a handful of pairs ties constantly (0.75 vs 0.75 on 12 pairs says nothing), so the
measure is continuous: each held-out pair's Bradley-Terry log-likelihood under both models,

    ll_i(model) = log sigmoid(r(x_i, y_chosen) - r(x_i, y_rejected))        [nats]
    gain_i      = ll_i(candidate) - ll_i(parent)

and the effect is the mean gain per pair with its t-interval over pairs (paired: both models
score the same pairs, so what the pairs have in common cancels). A positive gain means the
candidate puts more probability on what the labeler chose. Pairs are grouped by where they
come from: the dataset's held-out pairs (`human`) and labels of the policy's own samples
(`onpolicy`), the distribution that matters now; `combined` weighs the two groups by a share.

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

    def text(self) -> str:
        return (
            f"{self.gain:+.4f} nats/pair [{self.low:+.4f}, {self.high:+.4f}] on {self.pairs} pairs "
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
    gains = pair_loglik(*candidate) - pair_loglik(*parent)  # [N]
    mean, low, high, sd = t_interval(gains, confidence)
    return Effect(
        len(gains),
        mean,
        low,
        high,
        sd,
        _accuracy(candidate[0] - candidate[1]),
        _accuracy(parent[0] - parent[1]),
    )


def combined(human: Effect | None, onpolicy: Effect | None, share: float, confidence: float) -> Effect | None:
    """share x the on-policy gain + (1 - share) x the human gain, with a normal interval from
    the two groups' standard errors (independent pairs); None unless both groups have pairs
    enough for an interval."""
    if human is None or onpolicy is None or not (human.pairs > 1 and onpolicy.pairs > 1):
        return None
    if not (human.sd > 0 and onpolicy.sd > 0):
        return None
    gain = share * onpolicy.gain + (1 - share) * human.gain
    se = math.sqrt((share * onpolicy.sd) ** 2 / onpolicy.pairs + ((1 - share) * human.sd) ** 2 / human.pairs)
    half = z_quantile(confidence) * se
    pairs = human.pairs + onpolicy.pairs
    accuracy = (human.accuracy * human.pairs + onpolicy.accuracy * onpolicy.pairs) / pairs
    parent = (human.parent_accuracy * human.pairs + onpolicy.parent_accuracy * onpolicy.pairs) / pairs
    return Effect(pairs, gain, gain - half, gain + half, float("nan"), accuracy, parent)


def pairs_needed(e: Effect | None, confidence: float, min_effect: float) -> float:
    """On-policy pairs at which a t-interval of an effect this size (at least `min_effect`)
    excludes zero with POWER; NaN without an estimate of the spread."""
    if e is None or not e.sd > 0:
        return float("nan")
    z = z_quantile(confidence) + float(stats.norm.ppf(POWER))
    size = max(abs(e.gain), min_effect)
    return float(math.ceil((z * e.sd / size) ** 2))
