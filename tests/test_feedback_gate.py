"""Session feedback as evidence for the promotion rule (train.feedback_gate): the per-label
log-likelihood gain worked by hand, the rule's answers with a feedback group, and real retrains
on the tiny backbone with a DuckDB store where the new labels are session feedback."""

from __future__ import annotations

import math

import numpy as np
import pytest

from policy_trainer.outer_loop import evidence, label_budget_after
from rm_service import registry
from rm_service.conversation import Message
from rm_service.evidence import combined, gain_effect
from rm_service.settings import ModelSettings, StoreSettings, TrainSettings
from rm_service.store.db import Store
from rm_service.store.feedback import FeedbackIn, StoredFeedback, TurnThumb
from rm_service.store.labels import LabelIn
from rm_service.train.feedback_gate import LabelRead, feedback_effect, fit_offset, label_loglik
from rm_service.train.run import train

log_sig = lambda x: -math.log1p(math.exp(-x))  # log sigmoid(x)


def stored(label_id: str, first_user: str) -> StoredFeedback:
    chat = [Message("user", first_user), Message("assistant", "a reply")]
    return StoredFeedback(label_id=label_id, conversation=chat, thumbs=[TurnThumb(1, True)], seq=1)


def read(r, y, value=None, outcome=None, **offsets) -> LabelRead:
    return LabelRead(np.array(r, dtype=float), np.array(y, dtype=float), value, outcome, offsets)


def test_the_gain_of_a_label_is_its_thumbs_and_outcome_log_likelihood_over_the_parents():
    """Two labels, worked by hand. A: a thumb up on a turn the candidate gives 1.0 (offset 0)
    and a success it values 0.5 (offset 0); B: a thumb down on a turn it gives -1.0. The parent
    gives every turn and session 0 with offsets 0: log(1/2) per item."""
    candidate = {
        "a": (stored("a", "one"), read([1.0], [1], 0.5, 1.0, thumb_offset=0.0, outcome_offset=0.0)),
        "b": (stored("b", "two"), read([-1.0], [0], thumb_offset=0.0, outcome_offset=0.0)),
    }
    parent = {
        "a": read([0.0], [1], 0.0, 1.0, thumb_offset=0.0, outcome_offset=0.0),
        "b": read([0.0], [0], thumb_offset=0.0, outcome_offset=0.0),
    }
    gain_a = log_sig(1.0) + log_sig(0.5) - 2 * math.log(0.5)
    gain_b = log_sig(1.0) - math.log(0.5)  # log(1 - sigmoid(-1)) = log sigmoid(1)
    e = feedback_effect(candidate, parent, 5, 0.95)
    mean, sd = (gain_a + gain_b) / 2, abs(gain_a - gain_b) / math.sqrt(2)
    half = 12.706204736174705 * sd / math.sqrt(2)  # t(0.975, 1) x sd / sqrt(2)
    assert e.pairs == 2 and e.gain == pytest.approx(mean) and e.sd == pytest.approx(sd)
    assert e.low == pytest.approx(mean - half) and e.high == pytest.approx(mean + half)
    assert e.accuracy == 1.0 and e.parent_accuracy == 0.5  # 3 of 3 items right; the parent's ties count half
    assert label_loglik(candidate["a"][1], 0.0, 0.0) == (pytest.approx(log_sig(1.0) + log_sig(0.5)), 2.0, 2)


def test_a_parent_without_offsets_gets_them_fitted_on_the_other_folds():
    """A pairs-only parent has no P(up): its offset is the best one for the other folds' labels,
    so a label is never read with an offset fitted on itself."""
    r, y = np.zeros(100), (np.arange(100) < 30).astype(float)
    assert fit_offset(r, y) == pytest.approx(-math.log(0.3 / 0.7), abs=0.01)  # sigmoid(0 - b) = 0.3
    assert math.isfinite(fit_offset(np.zeros(5), np.ones(5)))  # one class: the prior keeps it finite
    labels = {f"l{i}": (stored(f"l{i}", f"question {i}"), read([0.0], [i % 2], thumb_offset=0.0)) for i in range(40)}
    parent = {i: read([0.0], [lab[1].y_thumb[0]]) for i, lab in labels.items()}  # the same reads, no offset
    e = feedback_effect(labels, parent, 5, 0.95)
    assert e.pairs == 40 and abs(e.gain) < 0.05  # about the balanced classes' own offset, fitted elsewhere
    assert e.gain != 0.0  # ... but not on the label itself


def test_the_rule_weighs_feedback_as_the_policy_s_evidence():
    rng = np.random.default_rng(0)
    human = gain_effect(rng.normal(0.0, 0.05, 185), 0.6, 0.6, 0.95)  # no difference on human pairs
    better = gain_effect(rng.normal(0.3, 0.2, 30), 0.8, 0.6, 0.95)
    worse = gain_effect(rng.normal(-0.3, 0.2, 30), 0.4, 0.6, 0.95)
    d = registry.decide(human, None, combined(human, None, 0.5, 0.95, better), 0.95, "v1", feedback=better)
    assert d.verdict == "promote" and "feedback on its sessions" in d.reason and d.combined.pairs == 215
    d = registry.decide(human, None, combined(human, None, 0.5, 0.95, worse), 0.95, "v1", feedback=worse)
    assert d.verdict == "reject" and "worse than its parent on feedback on its sessions" in d.reason
    onpolicy = gain_effect(rng.normal(0.3, 0.2, 10), 0.8, 0.6, 0.95)
    assert registry.decide(human, onpolicy, None, feedback=worse).verdict == "reject"  # worse on either: reject
    both = combined(human, onpolicy, 0.5, 0.95, better)  # the policy's half split 10 : 30 by counts
    assert both.gain == pytest.approx(0.5 * human.gain + 0.5 * (10 * onpolicy.gain + 30 * better.gain) / 40)
    back = registry.Decision.from_dict(d.to_dict())
    assert back.feedback == d.feedback and back.as_metrics()["gate_feedback_pairs"] == 30
    assert evidence(d.as_metrics())["feedback"]["pairs"] == 30  # what the trainer's events show


def test_an_undecided_feedback_only_retrain_waits_for_the_labels_its_rule_needs():
    job = type("Job", (), {})()
    job.decision, job.metrics = "undecided", {"gate_pairs_needed": 90.0, "gate_feedback_pairs": 30.0}
    assert label_budget_after(job, 24, 400) == 60  # feedback: one label is one item


# -- real retrains on the tiny backbone ------------------------------------------------------

TOPICS = [f"parcel {i}" for i in range(40)]
POLITE, RUDE = "Happy to help with {t}, thank you for asking.", "Whatever. {t} is not my problem, go away."
HELPFUL, VAGUE = "Your {t} ships today with tracking number 4417.", "Hmm, {t} might arrive at some point maybe."


def pairs_about_manners(n: int) -> list[LabelIn]:
    """v1's training: polite replies over rude ones (nothing about being helpful)."""
    return [
        LabelIn(f"m{i}", [Message("user", f"Where is my {t}?")], [POLITE.format(t=t), RUDE.format(t=t)], [0, 1],
                "HUMAN", "a")
        for i, t in enumerate(TOPICS[:n])
    ]  # fmt: skip


def sessions(n: int, outcomes: bool) -> list[FeedbackIn]:
    """The policy's sessions: two assistant turns each, helpful or vague; a thumb up on each
    helpful turn, down on each vague one; success when both turns were helpful."""
    rng = np.random.default_rng(7)
    out = []
    for i in range(n):
        t = f"order {i}"
        good = rng.random(2) < 0.5
        turns = [(HELPFUL if g else VAGUE).format(t=t) for g in good]
        chat = [Message("user", f"Any news on {t}?"), Message("assistant", turns[0])]
        chat += [Message("user", "And when exactly?"), Message("assistant", turns[1])]
        thumbs = [TurnThumb(1, bool(good[0])), TurnThumb(3, bool(good[1]))]
        outcome = float(good.all()) if outcomes else None
        out.append(FeedbackIn(f"s{i}", chat, thumbs, outcome, source="HUMAN", annotator="p"))
    return out


def retrain_on_feedback(home, backbone, extra_pairs: list[LabelIn], outcomes: bool, **kw):
    """v1 on the manners pairs (promoted), then session feedback (and `extra_pairs`) arrive and
    the retrain is decided: its result, and the retrain's stored decision."""
    store = Store(StoreSettings())
    settings = TrainSettings(
        backbone=str(backbone), max_minutes=2, ensemble_size=2, max_tokens=128, precision="fp32",
        export_onnx="off", heldout_fraction=0.2, **kw,
    )  # fmt: skip
    store.ingest(pairs_about_manners(40))
    assert train(store, settings, ModelSettings(), show_progress=False).promoted
    assert {o.status for o in store.ingest([*sessions(48, outcomes), *extra_pairs])} == {"INSERTED"}
    result = train(store, settings, ModelSettings(), show_progress=False)
    store.close()
    return result, registry.Decision.from_dict(result.decision)


def test_a_retrain_on_session_feedback_it_fits_better_is_promoted_on_that_feedback(home, tiny_backbone_dir):
    """The new labels are only thumbs and outcomes on the policy's sessions, about something v1
    never learned (helpful or vague): the retrain reads them better than v1 with its best offsets."""
    result, d = retrain_on_feedback(home, tiny_backbone_dir, [], outcomes=True)
    print(d.reason)
    assert d.feedback is not None and d.feedback.pairs == 48 and d.onpolicy is None
    assert d.feedback.low > 0 and d.verdict == "promote" and result.promoted
    assert "better than its parent on human pairs and feedback on its sessions" in d.reason
    assert registry.decide(None, None, None, feedback=d.feedback).verdict == "promote"  # the feedback alone decides
    assert result.metrics["gate_feedback_pairs"] == 48 and result.metrics["gate_feedback_gain"] > 0


def test_a_retrain_that_fits_the_session_feedback_worse_is_rejected(home, tiny_backbone_dir):
    """The same feedback, but new pairs (vague over helpful, weighted 4x) drag the retrain's turn
    reward against what people thumbed: it reads the thumbs worse than v1 and is rejected, though
    the new pairs alone would make it look better."""
    against = [
        LabelIn(f"x{i}", [Message("user", f"Any news on {t}?")], [VAGUE.format(t=t), HELPFUL.format(t=t)], [0, 1],
                "HUMAN", "b")
        for i, t in enumerate(f"box {j}" for j in range(60))
    ]  # fmt: skip
    result, d = retrain_on_feedback(home, tiny_backbone_dir, against, outcomes=False, pair_weight=4.0)
    print(d.reason)
    assert d.feedback is not None and d.feedback.pairs == 48
    assert d.feedback.high < 0 and d.verdict == "reject" and not result.promoted
