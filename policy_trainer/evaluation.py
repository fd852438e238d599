"""Evaluation on held-out prompts: the same random draws for the policy and the reference,
scored by the served proxy (the current version) and, when set, a gold reward model that the
policy never trains against; with the KL to the reference, where over-optimisation shows."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from policy_trainer.rollout import Rollout

if TYPE_CHECKING:
    from policy_trainer.policy import Loaded
    from policy_trainer.prompts import Prompt
    from policy_trainer.settings import PPOSettings
    from rm_client import RewardClient

EVAL_SEED = 1234


class EvaluationMixin:
    """PPOTrainer's evaluation, on the trainer's state and methods below."""

    m: Loaded
    s: PPOSettings
    eval_prompts: list[Prompt]
    gold: RewardClient | None
    step: int
    version: str
    rollout: Callable[..., Rollout]  # (prompts, prompt_index, lm=None)
    served_rewards: Callable[[list[Prompt], Rollout, int], tuple[torch.Tensor, dict]]
    token_logprobs: Callable[[Rollout], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]

    def eval_rollout(self, lm=None) -> Rollout:
        """Held-out prompts, `samples_per_prompt` samples each, on a fixed RNG stream (restored
        afterwards), so the policy and the reference see the same draws."""
        index = [i for i in range(len(self.eval_prompts)) for _ in range(self.s.samples_per_prompt)]
        with torch.random.fork_rng(devices=[self.m.device] if self.m.device.type == "cuda" else []):
            torch.manual_seed(EVAL_SEED)
            return self.rollout(self.eval_prompts, index, lm)

    def evaluate(self, lm=None, step: int = 0, rollout: Rollout | None = None) -> dict:
        """The held-out samples of `lm` (default: the policy) scored with the current version.
        `rollout`: samples already drawn by that model on the evaluation stream, to be rescored."""
        if not self.eval_prompts:
            return {}
        rollout = rollout if rollout is not None else self.eval_rollout(lm)
        served, _ = self.served_rewards(self.eval_prompts, rollout, step)
        mask = rollout.response_mask.to(self.m.device).float()  # [B, R]
        real = ~torch.isnan(served)
        out = {
            "reward_mean": float(served[real].mean()) if real.any() else float("nan"),
            "reward_std": float(served[real].std()) if real.sum() > 1 else 0.0,
            "kl_seq": self._kl_to_reference(rollout, mask) if lm is None and self.step > 0 else 0.0,
            "length_mean": float(mask.sum(1).mean()),
            "ended_fraction": float(rollout.ended.float().mean()),
            "n": len(rollout.texts),
            "version": self.version,
        }
        if self.gold is not None:
            out["gold_reward_mean"] = self.gold_reward(self.gold, rollout)
        return out

    def gold_reward(self, gold: RewardClient, rollout: Rollout) -> float:
        """Mean gold reward of the samples (pinned to gold_version): the held-out measure the
        policy never trains against, beside the served proxy (Gao et al., 2023)."""
        real = [i for i, t in enumerate(rollout.texts) if t]
        if not real:
            return float("nan")
        prompts = [self.eval_prompts[rollout.prompt_index[i]].messages for i in real]
        return float(
            np.mean(gold.score(prompts, [rollout.texts[i] for i in real], version=self.s.gold_version).rewards)
        )

    def _kl_to_reference(self, rollout: Rollout, mask: torch.Tensor) -> float:
        """Mean over sequences of sum_t (logprob_t - ref_logprob_t) on the sampled tokens."""
        logprobs, _, ref_logprobs = self.token_logprobs(rollout)  # [B, R]
        return float(((logprobs - ref_logprobs) * mask).sum(1).mean())


def eval_scalars(evaluation: dict) -> dict[str, float]:
    """An evaluation as scalars beside the step's metrics: proxy and gold reward of the held-out
    samples against KL and sqrt(KL) (Gao et al.'s axis)."""
    kl = evaluation.get("kl_seq", float("nan"))
    out = {
        "eval/proxy_reward": evaluation.get("reward_mean", float("nan")),
        "eval/kl": kl,
        "eval/sqrt_kl": float(np.sqrt(max(kl, 0.0))) if kl == kl else float("nan"),
    }
    if "gold_reward_mean" in evaluation:
        out["eval/gold_reward"] = evaluation["gold_reward_mean"]
    return out
