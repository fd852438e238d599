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
    members: np.ndarray | None = None  # [N, K] raw score of each ensemble member (K = 1 for a single head)

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
