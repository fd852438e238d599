"""What the demo report says about the outer loop: every promotion decision with its evidence,
and the gold reward's course (its peak, where it ended, and whether the policy over-optimised).

A demo run is one seed: these are its facts, not a claim about the method (the
over-optimisation bench, over paired seeds, makes those)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from rm_service.settings import TrainSettings


@dataclass(frozen=True)
class GoldCourse:
    """The gold reward of the held-out samples along the run."""

    reference: float  # the reference policy's (step 0)
    peak_step: int
    peak: float
    final_step: int
    final: float

    @property
    def overoptimised(self) -> bool:
        """The policy ended below where it started, by the gold's judgement."""
        return self.final < self.reference

    def text(self) -> str:
        verdict = (
            "**over-optimised**: the final gold is below the reference policy's"
            if self.overoptimised
            else "not over-optimised: the final gold is above the reference policy's"
        )
        drop = self.final - self.peak
        return (
            f"reference {self.reference:+.3f}; peak {self.peak:+.3f} at step {self.peak_step}; "
            f"final {self.final:+.3f} at step {self.final_step} ({drop:+.3f} from the peak); {verdict}"
        )


def gold_course(evaluations: list[dict], reference: float | None = None) -> GoldCourse | None:
    """From the policy's held-out evaluations in order (the first is step 0 unless `reference`
    gives the reference policy's gold); None without gold rewards."""
    scored = [(e["step"], e["gold_reward_mean"]) for e in evaluations if "gold_reward_mean" in e]
    if not scored:
        return None
    peak_step, peak = max(scored, key=lambda s: s[1])
    final_step, final = scored[-1]
    return GoldCourse(scored[0][1] if reference is None else reference, peak_step, peak, final_step, final)


def _interval(d: dict, group: str) -> str:
    e = d.get(group)
    if not e:
        return ""
    low = "-inf" if e.get("low") is None else f"{e['low']:+.3f}"
    high = "+inf" if e.get("high") is None else f"{e['high']:+.3f}"
    return f"{e['gain']:+.3f} [{low}, {high}] on {int(e['pairs'])}"


def decision_table(models: list) -> list[str]:
    """One row per decided version: what it was compared with, the verdict and its evidence."""
    rows = [
        "| version | against | verdict | human pairs: gain [interval] on n | policy's samples: gain [interval] on n "
        "| feedback on its sessions: gain [interval] on n labels | weighed together | on-policy pairs needed "
        "| status |",
        "|---|---|---|---|---|---|---|---:|---|",
    ]
    for m in models:
        d = m.decision
        if not d:
            continue
        needed = d.get("pairs_needed")
        rows.append(
            f"| {m.version} | {d.get('parent') or ''} | **{d['verdict']}** | {_interval(d, 'human')} | "
            f"{_interval(d, 'onpolicy')} | {_interval(d, 'feedback')} | {_interval(d, 'combined')} | "
            f"{'' if needed is None or not math.isfinite(needed) else int(needed)} | {m.status} |"
        )
    return rows if len(rows) > 2 else []


RULE = (
    "Each retrain is compared with the version served when it was trained, pair by pair, on pairs neither trained on: "
    "the held-out human pairs, and every label of the policy's samples since the parent's snapshot (each scored by "
    "a refit of the heads that left its fold out), and the thumbs and session outcomes given to the policy's "
    "sessions since then (per label, read the same way). The gain is the mean per-pair (per-label) "
    "log-likelihood of the label, candidate minus parent, in nats, with its {conf:.0%} interval. The rule "
    "promotes a retrain significantly better "
    "on human pairs, on the policy's samples, on that feedback or on all weighed together ({share:.0%} to the "
    "policy's evidence) and "
    "significantly worse on none; rejects one significantly worse; and otherwise answers undecided and asks for "
    "the on-policy pairs an effect of that size needs (the trainer waits for them before the next retrain)."
)


def rule_text() -> str:
    """RULE with the confidence and on-policy share the demo's server ran (TrainSettings from the environment)."""
    settings = TrainSettings()
    return RULE.format(conf=settings.gate_confidence, share=settings.gate_onpolicy_share)
