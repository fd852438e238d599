"""The PPO update: log-probabilities of a rollout under the policy and the reference, the
per-token rewards and advantages (a registered estimator), and `update_epochs` passes of
minibatches of the clipped objective (CleanRL's inner loop). Per-token tensors are [B, R]."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from policy_trainer.estimators import ESTIMATORS
from policy_trainer.policy import Loaded, reference_logits
from policy_trainer.ppo import (
    AdaptiveKLController,
    entropy_of,
    logprobs_of,
    masked_mean,
    masked_var,
    masked_whiten,
    per_token_rewards,
    policy_loss,
    value_loss,
)
from policy_trainer.rollout import Rollout

if TYPE_CHECKING:
    from policy_trainer.settings import PPOSettings


@dataclass
class Batch:
    """A scored rollout with everything the PPO update reads; per-token tensors are [B, R]."""

    rollout: Rollout
    mask: torch.Tensor
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    kl: torch.Tensor
    scores: torch.Tensor  # [B] what PPO saw at the last token
    served: torch.Tensor  # [B] the served reward (empty completions: NaN)
    members: np.ndarray  # [B, M] raw score of each ensemble member (empty completions: NaN)


class UpdateMixin:
    """PPOTrainer's update, on the trainer's state below."""

    m: Loaded
    s: PPOSettings
    optimizer: torch.optim.Optimizer
    kl_ctl: AdaptiveKLController

    def forward(self, rollout: Rollout, with_grad: bool):
        """Policy logits and values on a rollout (trimmed to its real columns)."""
        m, s = self.m, self.s
        ids, attn = rollout.input_ids.to(m.device), rollout.attention_mask.to(m.device)  # [b, P+R]
        with torch.set_grad_enabled(with_grad), m.autocast():
            return m.policy(ids, attn, rollout.response_len, s.temperature)  # [b, R, V], [b, R]

    @torch.no_grad()
    def ref_logprobs(self, rollout: Rollout) -> torch.Tensor:
        m = self.m
        ids, attn = rollout.input_ids.to(m.device), rollout.attention_mask.to(m.device)
        with m.autocast():
            logits = reference_logits(m.ref, ids, attn, rollout.response_len, self.s.temperature)  # [b, R, V]
        return logprobs_of(logits, rollout.response_ids.to(m.device))  # [b, R]

    def minibatch_rows(self, size: int) -> list[torch.Tensor]:
        chunk = max(1, -(-size // self.s.num_minibatches))  # ceil
        return [torch.arange(i, min(i + chunk, size)) for i in range(0, size, chunk)]

    @torch.no_grad()
    def token_logprobs(self, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """logprobs, values and ref_logprobs of the sampled tokens, each [B, R]; computed in
        minibatch-sized chunks to bound the [b, R, V] logits in memory."""
        dev, width = self.m.device, rollout.response_len
        logprobs, values, ref_logprobs = [], [], []
        for rows in self.minibatch_rows(len(rollout.texts)):
            part = trim(rollout.rows(rows))
            logits, v = self.forward(part, with_grad=False)
            logprobs.append(pad_right(logprobs_of(logits, part.response_ids.to(dev)), width))
            values.append(pad_right(v.float(), width))
            ref_logprobs.append(pad_right(self.ref_logprobs(part), width))
        return torch.cat(logprobs), torch.cat(values), torch.cat(ref_logprobs)

    @torch.no_grad()
    def make_batch(self, rollout: Rollout, scores: torch.Tensor, served: torch.Tensor, members: np.ndarray) -> Batch:
        s, dev = self.s, self.m.device
        logprobs, values, ref_logprobs = self.token_logprobs(rollout)  # [B, R] each
        mask = rollout.response_mask.to(dev).float()  # [B, R]
        rewards, kl = per_token_rewards(scores.to(dev), logprobs, ref_logprobs, mask, self.kl_ctl.value)  # [B, R]
        advantages, returns = ESTIMATORS[s.advantage_estimator].advantages(rewards, values, mask, s)  # [B, R] each
        if s.norm_adv:
            advantages = masked_whiten(advantages, mask)
        return Batch(
            rollout, mask, logprobs, ref_logprobs, values * mask, advantages, returns, kl, scores, served, members
        )

    def update(self, batch: Batch) -> dict:
        """update_epochs passes of minibatches of the clipped objective; returns mean stats."""
        s, dev = self.s, self.m.device
        stats: dict[str, list[float]] = {
            k: []
            for k in (
                "loss/policy",
                "loss/value",
                "policy/entropy",
                "policy/clipfrac",
                "policy/approx_kl",
                "value/clipfrac",
            )
        }
        size = len(batch.rollout.texts)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        for _ in range(s.update_epochs):
            perm = torch.randperm(size)
            for rows in self.minibatch_rows(size):
                idx = perm[rows]
                part = trim(batch.rollout.rows(idx))
                r = part.response_len
                mask, old_logprobs = batch.mask[idx, :r], batch.logprobs[idx, :r]  # [b, r]
                logits, values = self.forward(part, with_grad=True)  # [b, r, V], [b, r]
                logprobs = logprobs_of(logits, part.response_ids.to(dev))  # [b, r]
                entropy = masked_mean(entropy_of(logits), mask)
                pl = policy_loss(logprobs, old_logprobs, batch.advantages[idx, :r], mask, s.clip_coef)
                loss = pl.pg_loss - s.ent_coef * entropy
                if ESTIMATORS[s.advantage_estimator].needs_value_head:
                    vf_loss, vf_clipfrac = value_loss(
                        values.float(), batch.values[idx, :r], batch.returns[idx, :r], mask, s.clip_vf
                    )
                    loss = loss + s.vf_coef * vf_loss
                else:
                    vf_loss, vf_clipfrac = torch.zeros(()), torch.zeros(())
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
                self.optimizer.step()
                for key, value in (
                    ("loss/policy", pl.pg_loss),
                    ("loss/value", vf_loss),
                    ("policy/entropy", entropy),
                    ("policy/clipfrac", pl.clipfrac),
                    ("policy/approx_kl", pl.approx_kl),
                    ("value/clipfrac", vf_clipfrac),
                ):
                    stats[key].append(float(value.detach()))
        return {k: float(np.mean(v)) for k, v in stats.items()}


def trim(rollout: Rollout) -> Rollout:
    """Drop the left columns that are padding in every row and the right columns past the
    longest real response: a minibatch of short rows costs less. [b, P+R] -> [b, P'+R']."""
    first = int(rollout.query_mask.any(dim=0).int().argmax())
    last = int(rollout.response_mask.sum(dim=1).max())
    return Rollout(
        rollout.query_ids[:, first:],
        rollout.query_mask[:, first:],
        rollout.response_ids[:, :last],
        rollout.response_mask[:, :last],
        rollout.ended,
        rollout.texts,
        rollout.prompt_index,
    )


def pad_right(x: torch.Tensor, width: int) -> torch.Tensor:
    """[b, r] -> [b, width], zeros on the right."""
    return torch.nn.functional.pad(x, (0, width - x.shape[1]))


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    var_returns = float(masked_var(returns, mask))
    return float("nan") if var_returns == 0 else 1 - float(masked_var(returns - values, mask)) / var_returns


def update_metrics(batch: Batch, stats: dict, kl_coef: float, estimator: str) -> dict:
    """What a step reports about its update, single- or multi-turn: the KL per token and the
    coefficient it was charged at, the loss statistics, the value head's fit, the response length."""
    return {
        "kl/ref_token": float(masked_mean(batch.kl, batch.mask)),
        "kl/coef": kl_coef,
        **stats,
        "value/mean": float(masked_mean(batch.values, batch.mask)),
        "value/explained_var": (
            explained_variance(batch.values, batch.returns, batch.mask)
            if ESTIMATORS[estimator].needs_value_head
            else float("nan")
        ),
        "response/length_mean": float(batch.mask.sum(dim=1).mean()),
    }
