"""The PPO math, as in InstructGPT (Ouyang et al. 2022) and Ziegler et al. (2019).

Shapes: B sequences (rollout rows), R response tokens; `mask` [B, R] is 1 on real response
tokens (up to and including EOS) and 0 on padding. Every mean over tokens is a masked mean.

    rewards_t   = -kl_coef * (logprobs_t - ref_logprobs_t)  + [t = last real token] * score
    delta_t     = rewards_t + gamma * values_{t+1} - values_t
    advantage_t = delta_t + gamma * lambda * advantage_{t+1}           (GAE)
    returns_t   = advantage_t + values_t
    ratio_t     = exp(logprobs_t - old_logprobs_t)
    pg_loss     = mean max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - clip_coef, 1 + clip_coef))
    vf_loss     = 0.5 * mean max((V_t - returns_t)^2, (clip(V_t, V_old_t +- clip_vf) - returns_t)^2)
    loss        = pg_loss - ent_coef * entropy + vf_coef * vf_loss
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp_min(1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance of the real entries."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    return ((x - mean) ** 2 * mask).sum() / (n - 1).clamp_min(1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the real entries; padding stays 0 and does not move the statistics."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def logprobs_of(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log pi(token_t | context): logits [B, R, V], tokens [B, R] -> [B, R]."""
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_of(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of each next-token distribution: [B, R, V] -> [B, R]."""
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token: [B, R] -> [B]."""
    return (mask.sum(dim=1) - 1).clamp_min(0).long()


def per_token_rewards(
    scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The KL penalty on every real token, the score added at the last real one.
    scores [B], logprobs/ref_logprobs/mask [B, R] -> rewards [B, R], kl [B, R]."""
    kl = (logprobs - ref_logprobs) * mask  # [B, R]
    rewards = -kl_coef * kl  # [B, R]
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last_token_index(mask)] += scores
    return rewards, kl


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, gae_lambda: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens; the value after the last real
    token is 0 (the episode ends there). rewards, values, mask [B, R] -> advantages, returns [B, R]."""
    values = values * mask  # padding has no value, so V_{T+1} = 0 after the last real token
    rewards = rewards * mask
    num_tokens = rewards.shape[1]
    lastgaelam = torch.zeros_like(rewards[:, 0])  # [B]
    advantages_reversed = []
    for t in reversed(range(num_tokens)):
        nextvalues = values[:, t + 1] if t < num_tokens - 1 else torch.zeros_like(lastgaelam)
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * gae_lambda * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1) * mask  # [B, R]
    returns = advantages + values
    return advantages, returns


def rloo_advantages(rewards: torch.Tensor, mask: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE leave-one-out (Ahmadian et al. 2024): each sample's return (score minus the
    KL penalty, summed over its tokens) minus the mean return of the other samples of its
    prompt, given to every real token. Rows are grouped prompt-major: [p0 s0, p0 s1, ...].
    rewards, mask [B, R] -> advantages [B, R]."""
    returns = rewards.sum(dim=1).view(-1, group_size)  # [B/k, k]
    baseline = (returns.sum(dim=1, keepdim=True) - returns) / (group_size - 1)  # [B/k, k] mean of the others
    return (returns - baseline).reshape(-1, 1) * mask  # [B, R]


@dataclass
class PolicyLoss:
    pg_loss: torch.Tensor
    clipfrac: torch.Tensor
    approx_kl: torch.Tensor


def policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip_coef: float
) -> PolicyLoss:
    """The clipped surrogate objective (negated, to minimise), [B, R] inputs."""
    logratio = logprobs - old_logprobs
    ratio = logratio.exp()
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1 - clip_coef, 1 + clip_coef)
    pg_loss = masked_mean(torch.max(pg_loss1, pg_loss2), mask)
    with torch.no_grad():
        clipfrac = masked_mean(((ratio - 1).abs() > clip_coef).float(), mask)
        approx_kl = masked_mean((ratio - 1) - logratio, mask)  # the k3 estimator (Schulman)
    return PolicyLoss(pg_loss, clipfrac, approx_kl)


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip_vf: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared error to the returns, with the new values clipped around the rollout's.
    [B, R] inputs -> (vf_loss, vf_clipfrac)."""
    vf_loss_unclipped = (values - returns) ** 2
    if clip_vf is None:
        return 0.5 * masked_mean(vf_loss_unclipped, mask), torch.zeros(())
    values_clipped = old_values + torch.clamp(values - old_values, -clip_vf, clip_vf)
    vf_loss_clipped = (values_clipped - returns) ** 2
    vf_loss = 0.5 * masked_mean(torch.max(vf_loss_unclipped, vf_loss_clipped), mask)
    vf_clipfrac = masked_mean((vf_loss_clipped > vf_loss_unclipped).float(), mask)
    return vf_loss, vf_clipfrac.detach()


class AdaptiveKLController:
    """Ziegler et al. (2019): kl_coef *= 1 + clip(KL / target - 1, -0.2, 0.2) * n_sequences / horizon."""

    def __init__(self, kl_coef: float, target: float | None, horizon: int):
        self.value, self.target, self.horizon = kl_coef, target, horizon

    def update(self, current_kl: float, n_sequences: int) -> None:
        if self.target is None:  # fixed coefficient
            return
        proportional_error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + proportional_error * n_sequences / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.target, self.horizon = state["value"], state["target"], state["horizon"]


class RunningMoments:
    """Running mean and std of the served reward (Chan et al. parallel update), per
    reward-model version: reset when the trainer switches versions."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / (self.count - 1)) if self.count > 1 else 1.0

    def update(self, x: torch.Tensor) -> None:
        n = x.numel()
        if n == 0:
            return
        batch_mean = float(x.double().mean())
        batch_m2 = float(((x.double() - batch_mean) ** 2).sum())
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * n / total
        self.m2 += batch_m2 + delta**2 * self.count * n / total
        self.count = total

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean, self.m2 = state["count"], state["mean"], state["m2"]


def shape_scores(
    served: torch.Tensor,
    ended: torch.Tensor,
    moments: RunningMoments | None,
    reward_clip: float | None,
    missing_eos_penalty: float,
) -> torch.Tensor:
    """The score PPO sees: served reward, scaled by the version's running std and centred on
    its running mean (when `moments`), clipped, minus a penalty for completions without
    EOS. served, ended [B] -> [B]."""
    scores = served.double()
    if moments is not None:
        moments.update(scores)
        scores = (scores - moments.mean) / max(moments.std, 1e-6)
    if reward_clip is not None:
        scores = scores.clamp(-reward_clip, reward_clip)
    scores = scores - missing_eos_penalty * (~ended).double()
    return scores.float()
