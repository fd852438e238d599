"""Credit across the turns of a session: the multi-turn advantage estimators.

A session's assistant turns are rows of one rollout (the row's query is the conversation so
far, user turns included; its response is the policy's turn), so the policy loss, the KL, the
value loss and the entropy only ever see policy tokens: user and system tokens are context,
never actions. `Sessions` says which rows form a session and in which order. Per-token
rewards [N, R] hold the KL penalty on every policy token and, at each turn's last token, the
turn's reward (and at the session's last turn, the weighted session value).

- `session_token_gae`: GAE over the session's policy tokens in order, as one episode: the
  value after a turn's last token is the value at the next turn's first token (user tokens
  are skipped, not stepped through), 0 after the session's last token.
- `turn_gae` (Turn-PPO): a turn is one action. R_k = the sum of turn k's rewards, V_k = the
  value at its first token (the state before the turn); GAE over turns with the turn-level
  gamma and lambda; every token of turn k gets A_k, and the value target of its tokens is
  the turn return A_k + V_k.
- `turn_rloo` (critic-free, as MT-GRPO's turn-level advantages): G_k = R_k + gamma G_{k+1},
  minus the mean G_k of the other sessions from the same start that reached turn k (0 when
  none did); sessions are grouped start-major like single-turn samples.

With each row its own one-turn session (`Sessions.single`), session_token_gae is PPO's GAE
and turn_rloo is RLOO, so the single-turn trainer can use the same estimators.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from policy_trainer.ppo import gae


@dataclass(frozen=True)
class Sessions:
    """Where each row of a rollout sits: session [N] and turn within it [N] (0-based)."""

    session: torch.Tensor  # [N] long
    turn: torch.Tensor  # [N] long

    @classmethod
    def single(cls, n: int) -> Sessions:
        """Each row its own one-turn session (the single-turn trainer)."""
        return cls(torch.arange(n), torch.zeros(n, dtype=torch.long))

    @property
    def num_sessions(self) -> int:
        return int(self.session.max()) + 1 if self.session.numel() else 0

    @property
    def max_turns(self) -> int:
        return int(self.turn.max()) + 1 if self.turn.numel() else 0

    def to_grid(self, per_row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[N] per-row values -> ([S, T] grid, [S, T] mask of played turns)."""
        grid = per_row.new_zeros((self.num_sessions, self.max_turns))
        played = per_row.new_zeros((self.num_sessions, self.max_turns))
        grid[self.session, self.turn] = per_row
        played[self.session, self.turn] = 1
        return grid, played

    def from_grid(self, grid: torch.Tensor) -> torch.Tensor:
        """[S, T] -> [N]."""
        return grid[self.session, self.turn]


def turn_gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, sessions: Sessions, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn-level GAE. rewards, values, mask [N, R] -> advantages, returns [N, R]."""
    turn_rewards, played = sessions.to_grid((rewards * mask).sum(dim=1))  # [S, T]
    turn_values, _ = sessions.to_grid(values[:, 0])  # [S, T]: V before each turn
    adv, ret = gae(turn_rewards, turn_values, played, gamma, lam)  # [S, T] each
    return sessions.from_grid(adv)[:, None] * mask, sessions.from_grid(ret)[:, None] * mask  # [N, R]


def turn_rloo(
    rewards: torch.Tensor, mask: torch.Tensor, sessions: Sessions, gamma: float, group_size: int
) -> torch.Tensor:
    """Critic-free turn-level advantages. rewards, mask [N, R] -> advantages [N, R]."""
    turn_rewards, played = sessions.to_grid((rewards * mask).sum(dim=1))  # [S, T]
    returns = torch.zeros_like(turn_rewards)  # [S, T] discounted return from each turn on
    running = torch.zeros_like(turn_rewards[:, 0])
    for k in reversed(range(turn_rewards.shape[1])):
        running = (turn_rewards[:, k] + gamma * running) * played[:, k]
        returns[:, k] = running
    num_groups = returns.shape[0] // group_size
    g_returns = returns.view(num_groups, group_size, -1)  # [G, k, T]
    g_played = played.view(num_groups, group_size, -1)
    others = (g_returns * g_played).sum(dim=1, keepdim=True) - g_returns * g_played  # [G, k, T]
    n_others = g_played.sum(dim=1, keepdim=True) - g_played
    baseline = torch.where(n_others > 0, others / n_others.clamp_min(1), torch.zeros_like(others))
    adv = ((g_returns - baseline) * g_played).view_as(returns)  # [S, T]
    return sessions.from_grid(adv)[:, None] * mask  # [N, R]


def session_token_gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, sessions: Sessions, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-level GAE over each session's policy tokens in turn order.
    rewards, values, mask [N, R] -> advantages, returns [N, R]."""
    lengths = mask.sum(dim=1).long()  # [N]
    order = sorted(range(len(lengths)), key=lambda i: (int(sessions.session[i]), int(sessions.turn[i])))
    num_sessions = sessions.num_sessions
    session_len = torch.zeros(num_sessions, dtype=torch.long).index_add_(0, sessions.session, lengths)  # [S]
    width = int(session_len.max()) if num_sessions else 0
    flat_r, flat_v = rewards.new_zeros((num_sessions, width)), values.new_zeros((num_sessions, width))  # [S, L]
    flat_m = mask.new_zeros((num_sessions, width))
    where: list[tuple[int, int, int]] = []  # row -> (session, start column, length)
    filled = [0] * num_sessions
    for i in order:
        s, n = int(sessions.session[i]), int(lengths[i])
        start = filled[s]
        flat_r[s, start : start + n], flat_v[s, start : start + n] = rewards[i, :n], values[i, :n]
        flat_m[s, start : start + n] = 1
        where.append((i, s, start))
        filled[s] += n
    adv_flat, ret_flat = gae(flat_r, flat_v, flat_m, gamma, lam)  # [S, L]
    advantages, returns = torch.zeros_like(rewards), torch.zeros_like(rewards)  # [N, R]
    for i, s, start in where:
        n = int(lengths[i])
        advantages[i, :n], returns[i, :n] = adv_flat[s, start : start + n], ret_flat[s, start : start + n]
    return advantages, returns
