"""Advantage estimators, one registry: adding one touches this module only.

Each estimator turns per-token rewards (the KL penalty on every token, the score at the last
real token) into advantages and value targets, [B, R] each, and says whether it trains a
value head. The settings' `advantage_estimator` choices are this registry's names.

- gae: PPO's generalised advantage estimation over a value head (Schulman et al., 2016).
- rloo: REINFORCE leave-one-out (Ahmadian et al., 2024): each sample's return minus the mean
  return of the other samples of its prompt; critic-free.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, get_args

if TYPE_CHECKING:
    import torch

if TYPE_CHECKING:
    from policy_trainer.settings import PPOSettings


@dataclass(frozen=True)
class Estimator:
    needs_value_head: bool
    # (rewards [B, R], values [B, R], mask [B, R], settings) -> (advantages [B, R], returns [B, R])
    advantages: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, PPOSettings], tuple[torch.Tensor, torch.Tensor]]
    needs_groups: bool = False  # samples_per_prompt >= 2 (a baseline from the other samples)


def _gae(rewards, values, mask, s):
    from policy_trainer.ppo import gae  # torch loads with the trainer, not with the settings (`--version`)

    return gae(rewards, values, mask, s.gamma, s.gae_lambda)


def _rloo(rewards, values, mask, s):
    import torch

    from policy_trainer.ppo import rloo_advantages

    return rloo_advantages(rewards, mask, s.samples_per_prompt), torch.zeros_like(rewards)


ESTIMATORS: dict[str, Estimator] = {
    "gae": Estimator(True, _gae),
    "rloo": Estimator(False, _rloo, needs_groups=True),
}

# The settings' choices, written out so that type checkers see them; they must be the registry's names.
EstimatorName = Literal["gae", "rloo"]
if set(get_args(EstimatorName)) != set(ESTIMATORS):
    raise ImportError(f"EstimatorName {get_args(EstimatorName)} must list the registered estimators {list(ESTIMATORS)}")
