"""The trainer's view of served scores: the light client's ScoreResult as numpy arrays.

Scoring itself (deadlines, the retry budget, round-robin, one pinned version per batch, typed
errors: a failed score stops the step, never a silent zero) is rm_client's RewardClient; the
trainer imports it from there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rm_client import ScoreResult


@dataclass
class Scores:
    rewards: np.ndarray  # [N] normalised served reward
    raw: np.ndarray  # [N]
    uncertainty: np.ndarray  # [N]
    truncated: np.ndarray  # [N] bool
    version: str
    members: np.ndarray  # [N, K] raw score of each ensemble member (K = 1 for a single head)

    @classmethod
    def of(cls, result: ScoreResult) -> Scores:
        return cls(
            np.array(result.rewards, dtype=np.float64),
            np.array(result.raw_scores, dtype=np.float64),
            np.array(result.uncertainty, dtype=np.float64),
            np.array(result.truncated, dtype=bool),
            result.version,
            np.array(result.members, dtype=np.float64),
        )  # [N, K]


def conservative(scores: Scores, reward_mean: float, reward_std: float, how: str, k: float = 1.0) -> np.ndarray:
    """[N] the reward to optimise from the ensemble's members [N, M] in the version's
    normalised units (z = (raw - reward_mean) / reward_std): "none" the served reward (their
    mean), "mean_minus_std" mean(z) - k std(z), "min" min(z)."""
    if how == "none":
        return scores.rewards
    z = (scores.members - reward_mean) / reward_std  # [N, M]
    if how == "min":
        return z.min(axis=1)
    if how == "mean_minus_std":
        return z.mean(axis=1) - k * z.std(axis=1)
    raise ValueError(f"unknown reward_pessimism {how!r}")
