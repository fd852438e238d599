"""Which fresh samples go to labeling: few labels should do the most good.

A labeling candidate is one prompt with its K >= 2 distinct completions. Its acquisition
score is the ensemble's doubt about the best-doubted pair (i, j) among them:

    d_k = r_k(i) - r_k(j)                          each ensemble member's reward difference
    acquisition = Phi(-|mean_k d_k| / (std_k d_k + tau))

the probability, under a normal approximation of the members' spread, that the pair's order
is the other way round. It rises as the members disagree (std) and as the two rewards close
in (|mean|); `tau` keeps closeness informative when the members agree (a single head). A
pair the ensemble is sure about is worth little: its label only confirms what the served
reward already says.

`select(..., "uncertainty")` submits the highest-scoring groups, with the score as task
priority (labelers lease the highest first); "random" draws them uniformly (the baseline).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from itertools import combinations

import numpy as np

TAU = 0.1


@dataclass
class Group:
    prompt: list  # the prompt's messages
    completions: list[str]
    members: np.ndarray  # [K', M] member rewards of each completion (NaN: not scored)


def pair_doubt(a: np.ndarray, b: np.ndarray, tau: float = TAU) -> float:
    """Phi(-|mean d| / (std d + tau)) for member rewards a, b [M] of two completions."""
    d = a - b  # [M]
    z = abs(float(d.mean())) / (float(d.std()) + tau)
    return 0.5 * math.erfc(z / math.sqrt(2))  # Phi(-z)


def acquisition(group: Group) -> float:
    """The highest doubt over the group's pairs of distinct, scored completions (0 if none)."""
    seen: dict[str, int] = {}
    for i, text in enumerate(group.completions):
        if text.strip() and not np.isnan(group.members[i]).any():
            seen.setdefault(text, i)
    rows = list(seen.values())
    return max((pair_doubt(group.members[i], group.members[j]) for i, j in combinations(rows, 2)), default=0.0)


def select(groups: list[Group], n: int, how: str, rng: random.Random) -> list[tuple[Group, float]]:
    """`n` groups with their acquisition scores: the highest ("uncertainty") or a uniform draw ("random")."""
    scored = [(g, acquisition(g)) for g in groups]
    scored = [(g, a) for g, a in scored if len(set(t for t in g.completions if t.strip())) >= 2]
    if how == "random":
        return rng.sample(scored, min(n, len(scored)))
    return sorted(scored, key=lambda ga: -ga[1])[:n]
