"""The training loop: generate -> score -> PPO update, with the outer loop between batches.

One step (CleanRL's iteration):
  1. switch to a newly promoted reward-model version if one was announced (between batches);
  2. sample `prompts_per_step` prompts x `samples_per_prompt` completions (KV cache, EOS stops);
  3. score them over gRPC, the whole batch pinned to one version;
  4. one no-grad pass of the policy (old logprobs, values) and of the reference (ref_logprobs);
     per-token rewards (KL penalty on each token, the score at the last real token), then
     GAE (or RLOO) advantages, whitened over real tokens;
  5. `update_epochs` passes of `num_minibatches` minibatches of the clipped objective;
  6. adaptive KL update, metrics, labeling candidates / retraining checks, checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from policy_trainer import checkpoint
from policy_trainer.estimators import ESTIMATORS
from policy_trainer.evaluation import EvaluationMixin, eval_scalars
from policy_trainer.logs import RunLogger, plot
from policy_trainer.outer_loop import OuterLoop
from policy_trainer.policy import load_policy, save_policy, stop_token_ids
from policy_trainer.ppo import AdaptiveKLController, RunningMoments, shape_scores
from policy_trainer.prompts import Prompt, PromptSampler, prompt_sets, read_conversations
from policy_trainer.reward_client import Scores, conservative
from policy_trainer.rollout import Rollout, generate
from policy_trainer.selection import Group
from policy_trainer.settings import PPOSettings
from policy_trainer.update import Batch, UpdateMixin, update_metrics
from policy_trainer.watch import ModelWatcher, recover_version
from rm_client import RewardClient, VersionUnavailable, open_channel

log = logging.getLogger("policy_trainer")


@dataclass
class Summary:
    """What `train_ppo` returns."""

    steps: int
    run_dir: Path
    versions: list[str]  # reward-model versions trained against, in order
    switches: list[dict] = field(default_factory=list)  # {"step", "from_version", "to_version", "reason"}
    eval_before: dict | None = None  # the reference (= initial policy) on the held-out prompts, final version
    eval_after: dict | None = None  # the trained policy on the same prompts and RNG streams
    seconds_per_phase: dict = field(default_factory=dict)  # mean over steps: generate, score, train, step
    metrics: list[dict] = field(default_factory=list)  # one per step of this process
    policy_dir: Path | None = None
    plots: list[Path] = field(default_factory=list)
    retrains_requested: int = 0
    candidates_submitted: int = 0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class PPOTrainer(UpdateMixin, EvaluationMixin):
    def __init__(self, settings: PPOSettings, on_step: Callable[[dict], None] | None = None):
        s = self.s = settings
        self.on_step = on_step
        torch.set_num_threads(s.torch_threads or os.cpu_count() or 1)
        seed_everything(s.seed)
        conversations = read_conversations(s)
        self.m = load_policy(s.policy, s.device, s.precision)
        self.stop_ids = stop_token_ids(self.m.tokenizer, self.m.policy.lm)
        self.train_prompts, self.eval_prompts = prompt_sets(s, conversations, self.m.tokenizer)
        self.sampler = PromptSampler(len(self.train_prompts), s.seed)
        groups = [{"params": list(self.m.policy.lm.parameters()), "lr": s.learning_rate}]
        if ESTIMATORS[s.advantage_estimator].needs_value_head:
            value_lr = s.value_learning_rate or 10 * s.learning_rate
            groups.append({"params": list(self.m.policy.value_head.parameters()), "lr": value_lr})
        self.optimizer = torch.optim.AdamW(groups, eps=s.adam_eps, weight_decay=s.weight_decay)
        self.kl_ctl = AdaptiveKLController(s.kl_coef, s.kl_target if s.adaptive_kl else None, s.kl_horizon)
        self.moments = RunningMoments()
        token = s.auth_token.get_secret_value() if s.auth_token else None
        tls_ca = s.tls_ca.read_bytes() if s.tls_ca else None
        self.client = reward_client(s, s.reward_addresses, token, tls_ca)
        try:
            self.version = self.client.current_version()  # fails fast (bounded retries) when no server answers
        except Exception:
            self.client.close()
            raise
        self.gold = reward_client(s, [s.gold_address], token, tls_ca) if s.gold_address else None
        self.store_channel = open_channel(s.store_address or s.reward_addresses[0], token, tls_ca)
        self.watcher = ModelWatcher(self.client.channels) if s.follow_models else None  # where versions are served
        self.step = 0
        self.reward_stats: dict[str, tuple[float, float]] = {}  # version -> (reward_mean, reward_std), for pessimism
        self.switches: list[dict] = []
        self.eval_before: dict | None = None
        self.reference_eval: Rollout | None = None  # the held-out samples drawn at step 0, rescored at the end
        self.logger: RunLogger | None = None
        self.outer = OuterLoop.from_settings(self.store_channel, s, self._event)
        if s.resume:
            try:
                self._resume()
            except Exception:
                self.close()
                raise

    # -- events, switching -----------------------------------------------------------------

    def _event(self, kind: str, step: int, **fields) -> None:
        if self.logger is not None:
            self.logger.event(kind, step, **fields)
        else:
            log.info("step %d: %s %s", step, kind, fields)

    def switch_version(self, new: str, step: int, reason: str) -> None:
        """Score later batches with `new`; its rewards have their own scale, so the running
        statistics start over."""
        old, self.version = self.version, new
        self.moments.reset()
        self.switches.append({"step": step, "from_version": old, "to_version": new, "reason": reason})
        self._event("version_switch", step, from_version=old, to_version=new, reason=reason)

    def maybe_switch(self, step: int) -> None:
        latest = self.watcher.latest() if self.watcher else None
        if latest and latest != self.version:
            self.switch_version(latest, step, "promoted")

    # -- rollout and scoring ---------------------------------------------------------------

    def rollout(self, prompts: list[Prompt], prompt_index: list[int], lm=None) -> Rollout:
        s = self.s
        return generate(
            lm or self.m.policy.lm,
            self.m.tokenizer,
            prompts,
            prompt_index,
            self.stop_ids,
            s.max_new_tokens,
            s.temperature,
            s.top_p,
            self.m.device,
            self.m.autocast,
        )

    def served_rewards(self, prompts: list[Prompt], rollout: Rollout, step: int) -> tuple[torch.Tensor, dict]:
        """Served reward per row ([B], NaN for empty completions) from one pinned version.
        If the pinned version was unloaded meanwhile, switch to the one the scorers serve now
        (watch.recover_version) and score the whole batch again with it: a batch never mixes versions."""
        real = [i for i, t in enumerate(rollout.texts) if t]
        served = torch.full((len(rollout.texts),), float("nan"))
        info = {
            "uncertainty": float("nan"),
            "raw": float("nan"),
            "truncated": 0.0,
            "members": np.full((len(rollout.texts), 1), np.nan),
        }
        if not real:
            return served, info
        pairs = ([prompts[rollout.prompt_index[i]].messages for i in real], [rollout.texts[i] for i in real])
        try:
            scores = Scores.of(self.client.score(*pairs, version=self.version))
        except VersionUnavailable:
            latest = recover_version(self.version, self.watcher, self.client)  # the scorers' default now
            if latest is None:
                raise
            self.switch_version(latest, step, f"{self.version} no longer loaded")
            scores = Scores.of(self.client.score(*pairs, version=self.version))
        served[real] = torch.from_numpy(self.pessimistic(scores)).float()
        members = np.full((len(rollout.texts), scores.members.shape[1]), np.nan)  # [B, M]
        members[real] = scores.members
        info = {
            "uncertainty": float(scores.uncertainty.mean()),
            "raw": float(scores.raw.mean()),
            "truncated": float(scores.truncated.mean()),
            "members": members,
        }
        return served, info

    def pessimistic(self, scores: Scores) -> np.ndarray:
        """[N] the reward optimised: the served one, or a conservative one (reward_pessimism)."""
        if self.s.reward_pessimism != "none" and scores.version not in self.reward_stats:
            info = self.client.model_info(scores.version)
            self.reward_stats[scores.version] = (info.reward_mean, info.reward_std or 1.0)
        stats = self.reward_stats.get(scores.version, (0.0, 1.0))
        return conservative(scores, *stats, self.s.reward_pessimism, self.s.pessimism_k)

    def ppo_scores(self, served: torch.Tensor, ended: torch.Tensor) -> torch.Tensor:
        """[B] served (NaN: empty completion) -> [B] the score placed on the last token."""
        s = self.s
        real = ~torch.isnan(served)
        scores = torch.full_like(served, s.empty_completion_reward)
        if real.any():
            scores[real] = shape_scores(
                served[real],
                ended[real],
                self.moments if s.normalize_reward else None,
                s.reward_clip,
                s.missing_eos_penalty,
            )
        return scores

    def ppo_step(self, step: int) -> tuple[dict, Batch]:
        s = self.s
        t0 = time.perf_counter()
        chosen = self.sampler.next(s.prompts_per_step)
        prompt_index = [i for i in chosen for _ in range(s.samples_per_prompt)]  # prompt-major: [p0 s0, p0 s1, ...]
        rollout = self.rollout(self.train_prompts, prompt_index)
        t1 = time.perf_counter()
        served, info = self.served_rewards(self.train_prompts, rollout, step)
        scores = self.ppo_scores(served, rollout.ended)
        t2 = time.perf_counter()
        batch = self.make_batch(rollout, scores, served, info["members"])
        t3 = time.perf_counter()
        stats = self.update(batch)
        kl_seq = float(batch.kl.sum(dim=1).mean())
        kl_coef_used = self.kl_ctl.value
        self.kl_ctl.update(kl_seq, len(rollout.texts))
        t4 = time.perf_counter()
        real = ~torch.isnan(served)
        metrics = {
            "step": step,
            "reward/served_mean": float(served[real].mean()) if real.any() else float("nan"),
            "reward/served_std": float(served[real].std()) if real.sum() > 1 else 0.0,
            "reward/raw_mean": info["raw"],
            "reward/uncertainty_mean": info["uncertainty"],
            "reward/score_mean": float(scores.mean()),
            "reward/running_mean": self.moments.mean,
            "reward/running_std": self.moments.std,
            "kl/ref_seq": kl_seq,
            **update_metrics(batch, stats, kl_coef_used, s.advantage_estimator),
            "response/ended_fraction": float(rollout.ended.float().mean()),
            "response/empty_fraction": float((~real).float().mean()),
            "response/truncated_by_rm_fraction": info["truncated"],
            "rm/version": self.version,
            "time/generate_s": t1 - t0,
            "time/score_s": t2 - t1,
            "time/forward_s": t3 - t2,
            "time/train_s": t4 - t2,
            "time/step_s": t4 - t0,
            "outer/candidates_submitted": self.outer.submitted,
            "outer/retrains_requested": self.outer.retrains,
        }
        return metrics, batch

    # -- checkpoints -----------------------------------------------------------------------

    def state(self) -> dict:
        return {
            "policy": self.m.policy.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "kl_ctl": self.kl_ctl.state_dict(),
            "moments": self.moments.state_dict(),
            "sampler": self.sampler.state_dict(),
            "outer": self.outer.state_dict(),
            "version": self.version,
            "switches": self.switches,
            "eval_before": self.eval_before,
            "settings": json.loads(self.s.model_dump_json(exclude={"auth_token"})),
        }

    def _resume(self) -> None:
        path = checkpoint.latest(self.s.run_dir)
        if path is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {checkpoint.checkpoint_dir(self.s.run_dir)}")
        state = checkpoint.load(path)  # restores the RNG states
        self.m.policy.load_state_dict(state["policy"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.moments.load_state_dict(state["moments"])
        self.sampler.load_state_dict(state["sampler"])
        self.outer.load_state_dict(state["outer"])
        self.version, self.switches, self.eval_before = state["version"], state["switches"], state["eval_before"]
        self.step = state["step"]
        log.info("resumed from %s at step %d (reward model %s)", path, self.step, self.version)

    def save_checkpoint(self) -> Path:
        return checkpoint.save(self.s.run_dir, self.step, self.state(), self.s.keep_checkpoints)

    # -- the loop --------------------------------------------------------------------------

    def train(self) -> Summary:
        s = self.s
        logger = self.logger = RunLogger(s.run_dir, s.total_steps, self.step, s.tensorboard, s.progress)
        summary = Summary(steps=0, run_dir=s.run_dir, versions=[self.version])
        try:
            if self.step == 0 and self.eval_prompts:
                # Before the first update the policy is the reference: its samples are the reference's.
                self.reference_eval = self.eval_rollout()
                self.eval_before = self.evaluate(step=0, rollout=self.reference_eval)
                self._event("eval", 0, model="policy", **self.eval_before)
                logger.scalars(0, eval_scalars(self.eval_before))
            while self.step < s.total_steps:
                step = self.step + 1
                self.maybe_switch(step)
                metrics, batch = self.ppo_step(step)
                self.step = step
                if s.eval_every and step % s.eval_every == 0 and step < s.total_steps:
                    evaluation = self.evaluate(step=step)
                    self._event("eval", step, model="policy", **evaluation)
                    metrics.update(eval_scalars(evaluation))
                logger.step(metrics)
                summary.metrics.append(metrics)
                if self.on_step is not None:
                    self.on_step(metrics)
                self.submit_for_labeling(step, batch)
                self.outer.maybe_retrain(step)
                if s.checkpoint_every and step % s.checkpoint_every == 0:
                    self.save_checkpoint()
            self._finish(summary, logger)
        finally:
            logger.close()
        return summary

    def _finish(self, summary: Summary, logger: RunLogger) -> None:
        s = self.s
        if not s.checkpoint_every or self.step % s.checkpoint_every:
            self.save_checkpoint()
        if self.eval_prompts:
            # The reference's samples are drawn again only if this process did not draw them at step 0 (a resumed run).
            summary.eval_before = self.evaluate(lm=self.m.ref, step=self.step, rollout=self.reference_eval)
            summary.eval_after = self.evaluate(step=self.step)
            self._event("eval", self.step, model="reference", **summary.eval_before)
            self._event("eval", self.step, model="policy", **summary.eval_after)
            logger.scalars(self.step, eval_scalars(summary.eval_after))
        if s.save_policy:
            summary.policy_dir = save_policy(self.m, s.run_dir / "policy")
        if s.plots:
            summary.plots = plot(s.run_dir)
        summary.steps = self.step
        summary.switches = list(self.switches)
        summary.versions = list(dict.fromkeys([summary.versions[0], *(sw["to_version"] for sw in self.switches)]))
        if summary.metrics:
            summary.seconds_per_phase = {
                phase: float(np.mean([m[f"time/{phase}_s"] for m in summary.metrics]))
                for phase in ("generate", "score", "train", "step")
            }
        summary.retrains_requested, summary.candidates_submitted = self.outer.retrains, self.outer.submitted

    def submit_for_labeling(self, step: int, batch: Batch) -> None:
        """The outer loop's labeling side: this step's prompts and completions as ranking tasks."""
        self.outer.maybe_submit(step, self._groups(batch), self._sampling())

    def _groups(self, batch: Batch) -> list[Group]:
        k = self.s.samples_per_prompt
        texts, index = batch.rollout.texts, batch.rollout.prompt_index
        return [
            Group(self.train_prompts[index[i]].messages, texts[i : i + k], batch.members[i : i + k])
            for i in range(0, len(texts), k)
        ]

    def _sampling(self) -> dict[str, str]:
        s = self.s
        return {
            "temperature": str(s.temperature),
            "top_p": str(s.top_p),
            "max_new_tokens": str(s.max_new_tokens),
            "reward_model_version": self.version,
        }

    def close(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
        self.client.close()
        if self.gold is not None:
            self.gold.close()
        self.store_channel.close()


def reward_client(s: PPOSettings, addresses: list[str], token: str | None, tls_ca: bytes | None) -> RewardClient:
    """A RewardClient with the settings' deadline, retry budget and chunking."""
    return RewardClient(
        addresses, s.score_timeout_s, s.score_max_retries, s.score_backoff_s, s.score_backoff_max_s,
        s.score_chunk_items, token, tls_ca,
    )  # fmt: skip


def train_ppo(settings: PPOSettings, on_step: Callable[[dict], None] | None = None) -> Summary:
    """Train a policy with PPO against the served reward; the in-process API of the CLI.

    `on_step(metrics)` is called after every step with that step's metrics dict (the line
    written to metrics.jsonl). Returns a Summary (held-out reward before/after, switches,
    seconds per phase, paths)."""
    trainer = PPOTrainer(settings, on_step)
    try:
        return trainer.train()
    finally:
        trainer.close()
