"""Credit across turns on hand-worked tensors: turn-level GAE, token-level GAE over a session's
policy tokens, the critic-free turn baseline, and their one-turn special cases (PPO's GAE, RLOO)."""

from __future__ import annotations

import torch

from policy_trainer.estimators import ESTIMATORS
from policy_trainer.ppo import gae, rloo_advantages
from policy_trainer.turn_credit import Sessions, session_token_gae, turn_gae, turn_rloo


def _sessions(session: list[int], turn: list[int]) -> Sessions:
    return Sessions(torch.tensor(session), torch.tensor(turn))


def test_turn_gae_matches_a_hand_worked_example():
    # Session 0: turns 0 and 1 (rows 0, 1); session 1: one turn (row 2). Rows are in any order.
    # Row rewards sum to the turn rewards R = [1.0 + (-0.5), 2.0] and [3.0]; V_k = value at the turn's first token.
    # gamma 0.9, lambda 0.5:
    #   s0, k=1: delta = 2.0 - 0.4 = 1.6                              A = 1.6,  return 2.0
    #   s0, k=0: delta = 0.5 + 0.9 * 0.4 - 0.2 = 0.66                  A = 0.66 + 0.45 * 1.6 = 1.38, return 1.58
    #   s1, k=0: delta = 3.0 - 1.0 = 2.0                               A = 2.0,  return 3.0
    rewards = torch.tensor([[-0.5, 1.0, 7.0], [0.0, 2.0, 0.0], [3.0, 0.0, 0.0]])
    values = torch.tensor([[0.2, 0.9, 9.0], [0.4, 0.3, 0.0], [1.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # row 0's 7.0 is padding
    sessions = _sessions([0, 0, 1], [0, 1, 0])
    advantages, returns = turn_gae(rewards, values, mask, sessions, gamma=0.9, lam=0.5)
    torch.testing.assert_close(advantages, torch.tensor([[1.38, 1.38, 0.0], [1.6, 1.6, 0.0], [2.0, 0.0, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[1.58, 1.58, 0.0], [2.0, 2.0, 0.0], [3.0, 0.0, 0.0]]))


def test_session_token_gae_bootstraps_across_turns_and_skips_user_tokens():
    # One session: turn 0 has tokens (r 0.1, v 0.5), (r 1.0, v 0.2); turn 1 (row listed first) one token (r 2.0, v 0.3).
    # As one episode of 3 policy tokens, gamma 0.9, lambda 0.8 (user tokens in between are not steps):
    #   t=2: delta = 2.0 - 0.3 = 1.7                                   A = 1.7
    #   t=1: delta = 1.0 + 0.9 * 0.3 - 0.2 = 1.07                      A = 1.07 + 0.72 * 1.7 = 2.294
    #   t=0: delta = 0.1 + 0.9 * 0.2 - 0.5 = -0.22                     A = -0.22 + 0.72 * 2.294 = 1.43168
    rewards = torch.tensor([[2.0, 0.0], [0.1, 1.0]])
    values = torch.tensor([[0.3, 5.0], [0.5, 0.2]])
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    advantages, returns = session_token_gae(rewards, values, mask, _sessions([0, 0], [1, 0]), gamma=0.9, lam=0.8)
    torch.testing.assert_close(advantages, torch.tensor([[1.7, 0.0], [1.43168, 2.294]]))
    torch.testing.assert_close(returns, torch.tensor([[2.0, 0.0], [1.93168, 2.494]]))


def test_turn_rloo_matches_a_hand_worked_example():
    # One start, three sessions (group of 3), gamma 0.5. Turn rewards:
    #   s0: [1, 2]  -> returns [1 + 0.5*2, 2] = [2, 2]
    #   s1: [3]     -> [3]
    #   s2: [0, 4]  -> [0 + 0.5*4, 4] = [2, 4]
    # Turn 0 baselines: s0 (3+2)/2 = 2.5, s1 (2+2)/2 = 2, s2 (2+3)/2 = 2.5 -> A = -0.5, 1, -0.5
    # Turn 1: only s0 and s2 played it: s0 against 4 -> -2, s2 against 2 -> 2
    rewards = torch.tensor([[1.0], [2.0], [3.0], [0.0], [4.0]])
    mask = torch.ones(5, 1)
    sessions = _sessions([0, 0, 1, 2, 2], [0, 1, 0, 0, 1])
    advantages = turn_rloo(rewards, mask, sessions, gamma=0.5, group_size=3)
    torch.testing.assert_close(advantages, torch.tensor([[-0.5], [-2.0], [1.0], [-0.5], [2.0]]))


def test_a_turn_no_other_session_reached_has_a_zero_baseline():
    rewards, mask = torch.tensor([[1.0], [5.0], [2.0]]), torch.ones(3, 1)
    advantages = turn_rloo(rewards, mask, _sessions([0, 0, 1], [0, 1, 0]), gamma=1.0, group_size=2)
    torch.testing.assert_close(advantages, torch.tensor([[6.0 - 2.0], [5.0], [2.0 - 6.0]]))


def test_one_turn_sessions_reduce_to_the_single_turn_estimators():
    torch.manual_seed(0)
    rewards, values = torch.randn(6, 5), torch.randn(6, 5)
    mask = (torch.arange(5)[None, :] < torch.tensor([5, 3, 1, 4, 2, 5])[:, None]).float()
    single = Sessions.single(6)
    torch.testing.assert_close(
        session_token_gae(rewards, values, mask, single, 0.9, 0.8), gae(rewards, values, mask, 0.9, 0.8)
    )
    torch.testing.assert_close(turn_rloo(rewards, mask, single, 1.0, 3), rloo_advantages(rewards * mask, mask, 3))
    # turn_gae with one turn: the advantage is the turn's total reward minus the value before it, on every token
    advantages, _ = turn_gae(rewards, values, mask, single, 0.9, 0.8)
    torch.testing.assert_close(advantages, ((rewards * mask).sum(1) - values[:, 0])[:, None] * mask)


def test_the_registry_marks_rloo_single_turn_and_the_rest_multi_turn():
    assert {n for n, e in ESTIMATORS.items() if e.multi_turn} == {"gae", "turn_gae", "turn_rloo"}
    assert not ESTIMATORS["rloo"].multi_turn
