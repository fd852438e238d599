"""The outer loop of RLHF: label fresh policy samples, retrain the reward model, switch to it.

- `ModelWatcher` (policy_trainer.watch) follows the served versions; the trainer switches
  between batches (never inside one) and resets its reward statistics there.
- `OuterLoop.maybe_submit`: every `submit_every` steps, a fraction of the batch's prompts with
  all their distinct completions go to `PreferenceService.SubmitCandidates` (policy step in
  `policy_version` and in the sampling map), chosen by the served ensemble's doubt about
  their order (policy_trainer.selection; or at random), with that doubt as task priority,
  until `label_budget` candidates have been sent.
- `OuterLoop.maybe_submit_sessions` (multi-turn PPO): every `submit_every` steps, a
  `submit_fraction` of the step's played sessions, drawn at random (ScoreTurns serves no
  ensemble members to doubt with), go to `PreferenceService.SubmitSessions` as SESSION tasks:
  per-turn thumbs and a session outcome, by a judge (`rm-service judge --backend turns`) or
  people on the labeling page; the feedback they give counts towards the retrain like labels.
- `OuterLoop.maybe_retrain`: every `retrain_check_every` steps `GetStats`; with enough labels
  since the latest snapshot (the one the last retraining took, so a retraining the rule
  refused does not repeat on the same labels) and no job of ours still running,
  `TrainingService.RequestRetrain(promote=true)`. Enough is `retrain_min_labels`, until a
  retrain comes back undecided: then the labels its evidence says a decision needs
  (`label_budget_after`), between `retrain_min_labels` and `retrain_max_labels`. Each
  decision is logged with its evidence (`retrain_finished`: verdict, reason, per group the
  pairs, the mean log-likelihood gain and its interval).

Outer-loop RPC failures are logged as events and retried at the next check: labeling and
retraining are slow side paths that must not stop the policy's training. Scoring failures,
by contrast, do stop it (reward_client).
"""

from __future__ import annotations

import json
import logging
import math
import random
from typing import TYPE_CHECKING

import grpc

from policy_trainer.selection import Group, select
from rm_client.api.v1 import (
    preference_pb2,
    preference_pb2_grpc,
    training_pb2,
    training_pb2_grpc,
)
from rm_client.messages import to_proto
from rm_service.conversation import Message, scored_turns

if TYPE_CHECKING:
    from policy_trainer.settings import PPOSettings

log = logging.getLogger(__name__)
DONE_STATES = ("succeeded", "failed")


def candidates(
    prompts: list[list[Message]],
    completions: list[list[str]],
    step: int,
    sampling: dict[str, str],
    priorities: list[int] | None = None,
) -> list[preference_pb2.Candidate]:
    """Candidates (prompt + its distinct non-empty completions, K >= 2) for the labeling queue."""
    out = []
    for n, (prompt, texts) in enumerate(zip(prompts, completions, strict=True)):
        distinct = list(dict.fromkeys(t for t in texts if t.strip()))
        if len(distinct) < 2:
            continue
        out.append(
            preference_pb2.Candidate(
                prompt=to_proto(prompt),
                completions=distinct,
                policy_version=f"step-{step}",
                sampling={**sampling, "policy_step": str(step)},
                priority=priorities[n] if priorities else 0,
            )
        )
    return out


class OuterLoop:
    def __init__(
        self,
        channel: grpc.Channel,
        submit_every: int,
        submit_fraction: float,
        retrain_min_labels: int,
        retrain_check_every: int,
        retrain_mode: str,
        timeout_s: float,
        seed: int,
        event,
        selection: str = "uncertainty",
        label_budget: int = 0,
        retrain_max_labels: int = 0,
    ):
        self.preference = preference_pb2_grpc.PreferenceServiceStub(channel)
        self.training = training_pb2_grpc.TrainingServiceStub(channel)
        self.submit_every, self.submit_fraction = submit_every, submit_fraction
        self.selection, self.label_budget = selection, label_budget
        self.retrain_min_labels, self.retrain_check_every, self.retrain_mode = (
            retrain_min_labels,
            retrain_check_every,
            retrain_mode,
        )
        self.retrain_max_labels = retrain_max_labels or 8 * retrain_min_labels
        self.min_labels = retrain_min_labels  # labels the next retrain waits for (the rule's budget once undecided)
        self.timeout_s = timeout_s
        self.rng = random.Random(seed)
        self.event = event  # event(kind, step, **fields): the run's logger
        self.job_id: str | None = None
        self.submitted = 0
        self.retrains = 0

    @classmethod
    def from_settings(cls, channel: grpc.Channel, s: PPOSettings, event) -> OuterLoop:
        return cls(
            channel, s.submit_every, s.submit_fraction, s.retrain_min_labels, s.retrain_check_every, s.retrain_mode,
            s.score_timeout_s, s.seed, event, s.selection, s.label_budget, s.retrain_max_labels,
        )  # fmt: skip

    def _quota(self, step: int, available: int) -> int:
        """How many of `available` to send for labeling at this step (0: none)."""
        if not self.submit_every or step % self.submit_every:
            return 0
        n = max(1, round(self.submit_fraction * available))
        return min(n, self.label_budget - self.submitted) if self.label_budget else n

    def _send(self, step: int, submit, request, event: str, **fields) -> None:
        """One Submit* call; its tasks counted and logged, a failure logged (retried next time)."""
        try:
            response = submit(request, timeout=self.timeout_s)
        except grpc.RpcError as err:
            self.event("submit_failed", step, code=err.code().name, details=err.details())
            return
        self.submitted += len(response.task_ids)
        self.event(event, step, count=len(response.task_ids), **fields)

    def maybe_submit(self, step: int, groups: list[Group], sampling: dict[str, str]) -> None:
        """groups: each prompt of this batch with its completions and their member rewards."""
        n = self._quota(step, len(groups))
        if n <= 0:
            return
        chosen = select(groups, n, self.selection, self.rng)
        batch = candidates(
            [g.prompt for g, _ in chosen],
            [g.completions for g, _ in chosen],
            step,
            sampling,
            [int(round(1000 * a)) for _, a in chosen],
        )
        if batch:
            self._send(
                step,
                self.preference.SubmitCandidates,
                preference_pb2.SubmitCandidatesRequest(candidates=batch),
                "candidates_submitted",
                selection=self.selection,
                acquisition=[round(a, 4) for _, a in chosen],
            )

    def maybe_submit_sessions(self, step: int, conversations: list[list[Message]], sampling: dict[str, str]) -> None:
        """conversations: the step's played sessions (each up to its last assistant turn)."""
        distinct = list({json.dumps([m.as_dict() for m in c]): c for c in conversations if scored_turns(c)}.values())
        n = min(self._quota(step, len(conversations)), len(distinct))
        if n <= 0:
            return
        sessions = [
            preference_pb2.SessionCandidate(
                conversation=to_proto(c), policy_version=f"step-{step}", sampling={**sampling, "policy_step": str(step)}
            )
            for c in self.rng.sample(distinct, n)
        ]
        self._send(
            step,
            self.preference.SubmitSessions,
            preference_pb2.SubmitSessionsRequest(sessions=sessions),
            "sessions_submitted",
            selection="random",
        )

    def maybe_retrain(self, step: int) -> None:
        if not self.retrain_min_labels or step % self.retrain_check_every:
            return
        try:
            if self.job_id is not None and not self._job_finished(step):
                return
            stats = self.preference.GetStats(preference_pb2.GetStatsRequest(), timeout=self.timeout_s)
            if stats.labels_since_snapshot < self.min_labels:
                return
            request = training_pb2.RetrainRequest(
                mode=self.retrain_mode,
                promote=True,
                reason=f"policy trainer step {step}: {stats.labels_since_snapshot} labels since snapshot "
                f"{stats.latest_snapshot_id or 'none'}",
            )
            job = self.training.RequestRetrain(request, timeout=self.timeout_s)
        except grpc.RpcError as err:
            self.event("retrain_rpc_failed", step, code=err.code().name, details=err.details())
            return
        self.job_id = job.job_id
        self.retrains += 1
        self.event(
            "retrain_requested",
            step,
            job_id=job.job_id,
            state=job.state,
            labels_since_snapshot=stats.labels_since_snapshot,
        )

    def _job_finished(self, step: int) -> bool:
        job = self.training.GetJob(training_pb2.GetJobRequest(job_id=self.job_id), timeout=self.timeout_s)
        if job.state not in DONE_STATES:
            return False
        self.min_labels = label_budget_after(job, self.retrain_min_labels, self.retrain_max_labels)
        self.event(
            "retrain_finished",
            step,
            job_id=job.job_id,
            state=job.state,
            model_version=job.model_version,
            promoted=job.promoted,
            error=job.error,
            decision=job.decision,
            reason=job.decision_reason,
            evidence=evidence(job.metrics),
            next_retrain_labels=self.min_labels,
        )
        self.job_id = None
        return True

    def state_dict(self) -> dict:
        return {
            "rng": self.rng.getstate(),
            "job_id": self.job_id,
            "submitted": self.submitted,
            "retrains": self.retrains,
            "min_labels": self.min_labels,
        }

    def load_state_dict(self, state: dict) -> None:
        self.rng.setstate(state["rng"])
        self.job_id, self.submitted, self.retrains = state["job_id"], state["submitted"], state["retrains"]
        self.min_labels = state.get("min_labels", self.retrain_min_labels)


def evidence(metrics) -> dict[str, dict[str, float | None]]:
    """A finished job's evidence by group (human, onpolicy, feedback, combined): pairs (feedback:
    labels), the mean per-item log-likelihood gain over the parent and its interval (None: unbounded)."""
    out = {}
    for group in ("human", "onpolicy", "feedback", "combined"):
        if f"gate_{group}_pairs" in metrics:
            out[group] = {
                key: (value if math.isfinite(value) else None)
                for key in ("pairs", "gain", "low", "high", "accuracy", "parent_accuracy")
                for value in [float(metrics[f"gate_{group}_{key}"])]
            }
    return out


def label_budget_after(job, floor: int, ceiling: int) -> int:
    """Labels the next retrain waits for: `floor`, or after an undecided retrain the labels
    still missing from the on-policy pairs its rule needs (pairs converted to labels at the
    run's own pairs-per-label; feedback labels when the policy's evidence was feedback alone),
    capped at `ceiling`."""
    m = job.metrics
    needed, have, labels = (
        m.get("gate_pairs_needed", math.nan),
        m.get("gate_onpolicy_pairs", 0.0),
        m.get("gate_onpolicy_labels", 0.0),
    )
    if not have and m.get("gate_feedback_pairs"):  # a retrain on session feedback: one label, one item
        have = labels = m["gate_feedback_pairs"]
    if job.decision != "undecided" or not math.isfinite(needed) or not (have > 0 and labels > 0):
        return floor
    missing = math.ceil(max(needed - have, 0.0) * labels / have)
    return int(min(max(missing, floor), max(ceiling, floor)))
