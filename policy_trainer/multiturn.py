"""Multi-turn PPO: the policy plays whole conversations against a user simulator.

One step:
  1. `prompts_per_step` real openings (first user turns of the training conversations) x
     `samples_per_prompt` sessions, played forward up to `max_turns` assistant turns
     (policy_trainer.sessions), the user turns from a UserSimulator (policy_trainer.users);
  2. ScoreTurns per session, pinned to one reward-model version: a reward per assistant turn
     and the session value;
  3. per-token rewards on policy tokens only: the KL penalty on each, the turn's (shaped)
     reward at each turn's last token, `session_reward_weight` x the (normalised) session
     value at the session's last turn's last token;
  4. credit across turns by the registered estimator given the session structure
     (turn_gae, gae over the session's tokens, turn_rloo), whitened over policy tokens;
  5. the same clipped PPO update as single-turn (each assistant turn is a row; user tokens
     are context in the row's query, so they get no gradient, no KL, no value loss, no entropy);
  6. the outer loop: every `submit_every` steps a `submit_fraction` of the step's sessions go to
     the labeling queue as SESSION tasks (OuterLoop.maybe_submit_sessions), where the gold's
     ScoreTurns or people give per-turn thumbs and an outcome; the reward model retrains on
     that feedback (`retrain_min_labels`) and the trainer switches under the promotion rule.

Evaluation plays held-out openings on a fixed RNG stream with the policy and the reference
and scores them with the served version and, when set, the gold: per-turn reward and session
value, with the KL to the reference per session.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from policy_trainer.estimators import ESTIMATORS
from policy_trainer.evaluation import EVAL_SEED
from policy_trainer.ppo import RunningMoments, masked_whiten, per_token_rewards
from policy_trainer.prompts import read_conversations
from policy_trainer.session_settings import SessionSettings
from policy_trainer.sessions import SessionRollout, TurnScores, play_sessions, score_turns
from policy_trainer.trainer import PPOTrainer, Summary
from policy_trainer.update import Batch, update_metrics
from policy_trainer.users import ReplayUsers, UserSimulator, served_users
from rm_client import VersionUnavailable
from rm_service.conversation import Message, conversation_id


def opening(messages: list[Message]) -> list[Message]:
    """A conversation's first user turn (with a leading system message, if any)."""
    first_user = next(i for i, m in enumerate(messages) if m.role == "user")
    return list(messages[: first_user + 1])


class SessionTrainer(PPOTrainer):
    """PPOTrainer playing sessions instead of single replies (settings: SessionSettings)."""

    s: SessionSettings

    def __init__(self, settings: SessionSettings, on_step: Callable[[dict], None] | None = None):
        self.session_moments = RunningMoments()  # before PPOTrainer's __init__, which may resume into these
        self.last_played: SessionRollout | None = None  # the latest step's sessions, for the outer loop
        self.users_state: dict | None = None
        super().__init__(settings, on_step)
        s = self.s
        try:
            recordings = {conversation_id(c): c for c in read_conversations(s)}
            # Openings in train_prompts' / eval_prompts' order: the sampler and the held-out split are theirs.
            self.train_starts = [opening(recordings[p.conversation_id]) for p in self.train_prompts]
            self.eval_starts = [opening(recordings[p.conversation_id]) for p in self.eval_prompts]
            self.recordings = list(recordings.values())
            self.users = self.make_users(s.seed)
            if self.users_state is not None:
                self.users.load_state_dict(self.users_state)
        except Exception:
            self.close()
            raise
        self.pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="score-turns")

    def make_users(self, seed: int) -> UserSimulator:
        s = self.s
        if s.user_simulator == "replay":
            return ReplayUsers(self.recordings)
        return self._served_users(s.user_addresses or s.reward_addresses, seed)

    def make_heldout_users(self, seed: int) -> UserSimulator:
        """The held-out user model (eval_user_addresses), pinned, never followed: evaluation only."""
        update = {"user_model_version": self.s.eval_user_model_version, "follow_models": False}
        return self._served_users(self.s.eval_user_addresses, seed, update)

    def _served_users(self, addresses: list[str], seed: int, update: dict | None = None) -> UserSimulator:
        s = self.s
        token = s.auth_token.get_secret_value() if s.auth_token else None
        tls_ca = s.tls_ca.read_bytes() if s.tls_ca else None
        return served_users(addresses, token, tls_ca, s.model_copy(update={"seed": seed, **(update or {})}))

    def state(self) -> dict:
        users = self.users.state_dict() if hasattr(self.users, "state_dict") else None
        return {**super().state(), "session_moments": self.session_moments.state_dict(), "users": users}

    def _resume(self) -> None:
        super()._resume()
        from policy_trainer import checkpoint

        path = checkpoint.latest(self.s.run_dir)
        assert path is not None  # PPOTrainer's _resume raised otherwise
        state = checkpoint.load(path)  # the same RNG state again
        self.session_moments.load_state_dict(state["session_moments"])
        self.users_state = state["users"]  # loaded into the simulator once it exists (after PPOTrainer's __init__)

    def switch_version(self, new: str, step: int, reason: str) -> None:
        super().switch_version(new, step, reason)
        self.session_moments.reset()

    # -- scoring -----------------------------------------------------------------------------

    def turn_scores(self, played: SessionRollout, step: int) -> TurnScores:
        """ScoreTurns of every session, one pinned version; if it was unloaded meanwhile, switch
        to the announced one and score the whole step again (a step never mixes versions)."""
        try:
            return score_turns(self.client, played, self.version, self.pool)
        except VersionUnavailable:
            latest = self.watcher.latest() if self.watcher else None
            if not latest or latest == self.version:
                raise
            self.switch_version(latest, step, f"{self.version} no longer loaded")
            return score_turns(self.client, played, self.version, self.pool)

    def row_scores(self, played: SessionRollout, scored: TurnScores) -> torch.Tensor:
        """[N] what PPO sees at each turn's last token: the shaped turn reward, plus at each
        session's last turn session_reward_weight x its normalised session value."""
        s = self.s
        scores = self.ppo_scores(scored.turn_reward, played.rollout.ended)  # [N]; empty replies: the empty reward
        if s.session_reward_weight:
            value = scored.session_value.double()  # [S]
            real = ~torch.isnan(value)
            if s.normalize_reward and real.any():
                self.session_moments.update(value[real])
                value = (value - self.session_moments.mean) / max(self.session_moments.std, 1e-6)
            for j, session in enumerate(played.sessions):
                if real[j]:
                    scores[session.rows[-1]] += s.session_reward_weight * float(value[j])
        return scores

    # -- the batch -------------------------------------------------------------------------

    @torch.no_grad()
    def make_session_batch(self, played: SessionRollout, scores: torch.Tensor, served: torch.Tensor) -> Batch:
        s, dev = self.s, self.m.device
        rollout = played.rollout
        logprobs, values, ref_logprobs = self.token_logprobs(rollout)  # [N, R] each
        mask = rollout.response_mask.to(dev).float()  # [N, R]
        rewards, kl = per_token_rewards(scores.to(dev), logprobs, ref_logprobs, mask, self.kl_ctl.value)  # [N, R]
        index = type(played.index)(played.index.session.to(dev), played.index.turn.to(dev))
        advantages, returns = ESTIMATORS[s.advantage_estimator].advantages(rewards, values, mask, s, index)
        if s.norm_adv:
            advantages = masked_whiten(advantages, mask)
        members = np.full((len(rollout.texts), 1), np.nan)
        return Batch(
            rollout, mask, logprobs, ref_logprobs, values * mask, advantages, returns, kl, scores, served, members
        )

    def ppo_step(self, step: int) -> tuple[dict, Batch]:
        s = self.s
        t0 = time.perf_counter()
        chosen = self.sampler.next(s.prompts_per_step)
        start_index = [i for i in chosen for _ in range(s.samples_per_prompt)]  # start-major: groups of sessions
        played = self.last_played = play_sessions(self, self.train_starts, start_index, self.users, s.max_turns)
        t1 = time.perf_counter()
        scored = self.turn_scores(played, step)
        scores = self.row_scores(played, scored)
        t2 = time.perf_counter()
        batch = self.make_session_batch(played, scores, scored.turn_reward)
        t3 = time.perf_counter()
        stats = self.update(batch)
        kl_turn = float(batch.kl.sum(dim=1).mean())
        kl_coef_used = self.kl_ctl.value
        self.kl_ctl.update(kl_turn, len(played.rollout.texts))
        t4 = time.perf_counter()
        metrics = {
            "step": step,
            **session_metrics(played, scored),
            "reward/score_mean": float(scores.mean()),
            "kl/ref_turn": kl_turn,
            "kl/ref_seq": float(session_sums(batch.kl.sum(dim=1).cpu(), played).mean()),  # per session
            **update_metrics(batch, stats, kl_coef_used, s.advantage_estimator),
            "response/ended_fraction": float(played.rollout.ended.float().mean()),
            "rm/version": self.version,
            "user/version": self.users.version,
            "time/generate_s": t1 - t0,
            "time/score_s": t2 - t1,
            "time/forward_s": t3 - t2,
            "time/train_s": t4 - t2,
            "time/step_s": t4 - t0,
        }
        return metrics, batch

    def submit_for_labeling(self, step: int, batch: Batch) -> None:
        """The step's played sessions as SESSION tasks (thumbs per turn, a session outcome)."""
        played = self.last_played
        conversations = [x.scored_conversation() for x in played.sessions] if played is not None else []
        sampling = {**self._sampling(), "user_simulator": self.s.user_simulator, "user_version": self.users.version}
        self.outer.maybe_submit_sessions(step, conversations, sampling)

    # -- evaluation ------------------------------------------------------------------------

    def eval_rollout(self, lm=None, heldout_users: bool = False) -> SessionRollout:  # type: ignore[override]
        """Held-out openings, `samples_per_prompt` sessions each, on a fixed RNG stream for the
        policy and the user simulator, so the policy and the reference see the same draws.
        `heldout_users`: against the held-out user model instead of the training simulator."""
        index = [i for i in range(len(self.eval_starts)) for _ in range(self.s.samples_per_prompt)]
        users = self.make_heldout_users(EVAL_SEED) if heldout_users else self.make_users(EVAL_SEED)
        try:
            with torch.random.fork_rng(devices=[self.m.device] if self.m.device.type == "cuda" else []):
                torch.manual_seed(EVAL_SEED)
                return play_sessions(self, self.eval_starts, index, users, self.s.max_turns, lm)
        finally:
            if hasattr(users, "close"):
                users.close()

    def evaluate(self, lm=None, step: int = 0, rollout: SessionRollout | None = None) -> dict:  # type: ignore[override]
        """Held-out sessions against the training simulator; with eval_user_addresses also
        against the held-out user model (keys `heldout_users_*`), and the difference of each
        reward between the two (`simulator_gap_*`: what the training simulator flatters)."""
        if not self.eval_starts:
            return {}
        played = rollout if rollout is not None else self.eval_rollout(lm)
        out = {**self._session_eval(played, lm, step), "n": len(played.sessions), "version": self.version}
        if self.s.eval_user_addresses:
            heldout = self._session_eval(self.eval_rollout(lm, heldout_users=True), lm, step)
            out.update({f"heldout_users_{k}": v for k, v in heldout.items()})
            for key in ("reward_mean", "session_value_mean", "gold_reward_mean", "gold_session_value_mean"):
                if key in heldout:
                    out[f"simulator_gap_{key}"] = out[key] - heldout[key]
        return out

    def _session_eval(self, played: SessionRollout, lm, step: int) -> dict:
        scored = self.turn_scores(played, step)
        out = {
            "reward_mean": nanmean(scored.turn_reward),
            "session_value_mean": nanmean(scored.session_value),
            "turns_mean": float(played.turns_per_session.mean()),
            "kl_seq": self._session_kl(played) if lm is None and self.step > 0 else 0.0,
        }
        out.update({f"reward_turn{k + 1}": v for k, v in enumerate(per_turn_means(played, scored.turn_reward))})
        if self.gold is not None:
            gold = score_turns(self.gold, played, self.s.gold_version, self.pool)
            out["gold_reward_mean"] = nanmean(gold.turn_reward)
            out["gold_session_value_mean"] = nanmean(gold.session_value)
            out.update({f"gold_reward_turn{k + 1}": v for k, v in enumerate(per_turn_means(played, gold.turn_reward))})
        return out

    def _session_kl(self, played: SessionRollout) -> float:
        """Mean over sessions of sum over their policy tokens of (logprob - ref_logprob)."""
        logprobs, _, ref_logprobs = self.token_logprobs(played.rollout)  # [N, R]
        mask = played.rollout.response_mask.to(self.m.device).float()
        return float(session_sums(((logprobs - ref_logprobs) * mask).sum(dim=1).cpu(), played).mean())

    def close(self) -> None:
        if hasattr(self, "pool"):
            self.pool.shutdown(wait=False)
        users = getattr(self, "users", None)
        if users is not None and hasattr(users, "close"):
            users.close()
        super().close()


def nanmean(x: torch.Tensor) -> float:
    real = ~torch.isnan(x)
    return float(x[real].mean()) if real.any() else float("nan")


def session_sums(per_row: torch.Tensor, played: SessionRollout) -> torch.Tensor:
    """[N] per row -> [S] summed over each session's rows."""
    return torch.zeros(len(played.sessions), dtype=per_row.dtype).index_add_(0, played.index.session.cpu(), per_row)


def per_turn_means(played: SessionRollout, per_row: torch.Tensor) -> list[float]:
    """Mean of a per-row quantity at each turn index (turn 1, 2, ...), NaN rows left out."""
    turn = played.index.turn.cpu()
    return [nanmean(per_row[turn == k]) for k in range(int(turn.max()) + 1 if turn.numel() else 0)]


def session_metrics(played: SessionRollout, scored: TurnScores) -> dict:
    ended_by = [x.ended_by for x in played.sessions]
    out = {
        "reward/served_mean": nanmean(scored.turn_reward),
        "reward/served_std": float(np.nanstd(scored.turn_reward.numpy())) if len(scored.turn_reward) > 1 else 0.0,
        "reward/raw_mean": nanmean(scored.turn_raw),
        "session/value_mean": nanmean(scored.session_value),
        "session/success_mean": nanmean(scored.session_success),
        "session/turns_mean": float(played.turns_per_session.mean()),
        "session/ended_by_user_fraction": ended_by.count("user") / len(ended_by),
        "session/empty_reply_fraction": ended_by.count("empty_reply") / len(ended_by),
    }
    out.update({f"reward/turn{k + 1}_mean": v for k, v in enumerate(per_turn_means(played, scored.turn_reward))})
    return out


def train_sessions(settings: SessionSettings, on_step: Callable[[dict], None] | None = None) -> Summary:
    """Multi-turn PPO (the in-process API of `policy-trainer sessions`); see train_ppo."""
    trainer = SessionTrainer(settings, on_step)
    try:
        return trainer.train()
    finally:
        trainer.close()
