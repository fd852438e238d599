"""Advantage estimators, one registry: adding one touches this module only.

Each estimator turns per-token rewards (the KL penalty on every token, the score at the last
real token) into advantages and value targets, [B, R] each, and says whether it trains a
value head. The settings' `advantage_estimator` choices are this registry's names. Given
`sessions` (policy_trainer.turn_credit.Sessions: which rows are the turns of one
conversation), the multi-turn ones assign credit across turns; without, each row is its own
one-turn session. `gamma` and `gae_lambda` are per token for gae, per turn for the turn_*.

- gae: PPO's generalised advantage estimation over a value head (Schulman et al., 2016); over
  sessions, token-level GAE across all the session's policy tokens, user tokens skipped.
- rloo: REINFORCE leave-one-out (Ahmadian et al., 2024): each sample's return minus the mean
  return of the other samples of its prompt; critic-free; single turn only.
- turn_gae: a turn is one action (Turn-PPO): GAE over turn rewards with a turn-level value.
- turn_rloo: critic-free turn-level advantages (MT-GRPO): each turn's return minus the mean
  return at that turn of the other sessions from the same start.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, get_args

if TYPE_CHECKING:
    import torch

    from policy_trainer.turn_credit import Sessions

if TYPE_CHECKING:
    from policy_trainer.settings import PPOSettings  # noqa: F401  (the settings argument's type)

# torch loads with the trainer, not with the settings (`--version`): the estimators import it when called.


@dataclass(frozen=True)
class Estimator:
    needs_value_head: bool
    # (rewards [B, R], values [B, R], mask [B, R], settings, sessions | None) -> (advantages [B, R], returns [B, R])
    advantages: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    needs_groups: bool = False  # samples_per_prompt >= 2 (a baseline from the other samples)
    multi_turn: bool = True  # assigns credit across the turns of a session


def _gae(rewards, values, mask, s, sessions: Sessions | None = None):
    from policy_trainer.ppo import gae
    from policy_trainer.turn_credit import session_token_gae

    if sessions is None:
        return gae(rewards, values, mask, s.gamma, s.gae_lambda)
    return session_token_gae(rewards, values, mask, sessions, s.gamma, s.gae_lambda)


def _rloo(rewards, values, mask, s, sessions: Sessions | None = None):
    import torch

    from policy_trainer.ppo import rloo_advantages

    return rloo_advantages(rewards, mask, s.samples_per_prompt), torch.zeros_like(rewards)


def _turn_gae(rewards, values, mask, s, sessions: Sessions | None = None):
    from policy_trainer.turn_credit import Sessions, turn_gae

    return turn_gae(rewards, values, mask, sessions or Sessions.single(len(rewards)), s.gamma, s.gae_lambda)


def _turn_rloo(rewards, values, mask, s, sessions: Sessions | None = None):
    import torch

    from policy_trainer.turn_credit import Sessions, turn_rloo

    sessions = sessions or Sessions.single(len(rewards))
    return turn_rloo(rewards, mask, sessions, s.gamma, s.samples_per_prompt), torch.zeros_like(rewards)


ESTIMATORS: dict[str, Estimator] = {
    "gae": Estimator(True, _gae),
    "rloo": Estimator(False, _rloo, needs_groups=True, multi_turn=False),
    "turn_gae": Estimator(True, _turn_gae),
    "turn_rloo": Estimator(False, _turn_rloo, needs_groups=True),
}

# The settings' choices, written out so that type checkers see them; they must be the registry's names.
EstimatorName = Literal["gae", "rloo", "turn_gae", "turn_rloo"]
if set(get_args(EstimatorName)) != set(ESTIMATORS):
    raise ImportError(f"EstimatorName {get_args(EstimatorName)} must list the registered estimators {list(ESTIMATORS)}")
